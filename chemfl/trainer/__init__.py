"""The facility trainer: one long-lived, data-parallel process group per batch job.

`chemfl trainer` runs one process per GPU (tile, GCD) across the job's nodes. Every rank loads the
base model and the seeded adapter once; rank 0 serves train / evaluate requests on a node-local
Unix socket (`channel.py`) that a thin ClientApp relay forwards Flower messages to, so the model is
never reloaded per message. Modules: `ranks` (torch.distributed's environment from torchrun, PMI or
Slurm), `admission` (what rank 0 checks before a task starts), `channel` (the authenticated socket
protocol, numpy only), `group` (backend, devices, collectives), `service` (the ranks' loops), `cli`.

Nothing is imported here: the relay imports `chemfl.trainer.channel` without torch.
"""
