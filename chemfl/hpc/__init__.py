"""HPC facts several rooms use: batch-job walltime left, scheduler queries, the launcher's launch.jsonl log.
Imports neither torch nor flwr."""
