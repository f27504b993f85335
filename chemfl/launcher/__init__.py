"""Flower SuperNodes inside batch jobs on Polaris, Aurora, Frontier and Perlmutter (launcher issue)."""
