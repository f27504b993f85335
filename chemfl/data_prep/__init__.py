"""Chemistry instruction data: sources, tasks, leakage-free splits, facility partitions, metrics."""
