"""Emulating HPC facilities on one machine.

- `slowdown`: real-time heterogeneity (a facility sleeps k x its training time).
- `campaign` + `grid`: virtual-time campaigns. Each facility runs batch jobs with a walltime
  after a queue wait; its SuperNode exists only while a job runs; a dispatched task's emulated
  duration is known when it is sent, so completions are processed in virtual-time order while
  the training itself is real. The same seed gives the same campaign on any machine.
"""

from chemfl.emulation.slowdown import emulate_slowdown, parse_slowdown

__all__ = ["emulate_slowdown", "parse_slowdown"]
