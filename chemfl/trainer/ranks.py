"""Where this process sits in the job: its rank, the world size, its rank on the node and rank 0's
address, read from whichever launcher started it. No torch: unit-tested with plain dicts.

Sources, first found wins:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- mpiexec with PMI (PALS on Polaris and Aurora): PMI_RANK, PMI_SIZE, and PALS_LOCAL_RANKID or
  PMI_LOCAL_RANK; rank 0's host is MASTER_ADDR, else the first line of $PBS_NODEFILE.
- srun (Slurm: Frontier, Perlmutter): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; rank 0's host is
  MASTER_ADDR, else the first host of SLURM_JOB_NODELIST (the first task runs on the first node).
- none of these: a single process (world size 1).
MASTER_PORT defaults to 29500, torch.distributed's usual port.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from chemfl.errors import ChemFLError

DEFAULT_MASTER_PORT = 29500
LOCAL_HOST = "127.0.0.1"
BACKENDS = ("auto", "nccl", "gloo", "xccl", "ccl")  # how the ranks talk: `--backend` (group.choose_backend)


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int  # this process's index on its node: which of the node's GPUs it drives
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "pmi", "slurm" or "single"

    def torch_environ(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous and accelerate read, so both see the
        same ranks whichever launcher started the process."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def rank_env(environ: Mapping[str, str] = os.environ) -> RankEnv:
    """This process's RankEnv from the launcher's variables (see the module docstring)."""
    port = _integer(environ, "MASTER_PORT", DEFAULT_MASTER_PORT)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _integer(environ, "RANK"), _integer(environ, "WORLD_SIZE")
        local = _integer(environ, "LOCAL_RANK", 0)
        return _checked(RankEnv(rank, world, local, environ.get("MASTER_ADDR", LOCAL_HOST), port, "torchrun"))
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        rank, world = _integer(environ, "PMI_RANK"), _integer(environ, "PMI_SIZE")
        local_key = next((key for key in ("PALS_LOCAL_RANKID", "PMI_LOCAL_RANK") if key in environ), None)
        if local_key is None and world > 1:
            raise ChemFLError(
                "PMI_RANK and PMI_SIZE are set but neither PALS_LOCAL_RANKID nor PMI_LOCAL_RANK: this rank "
                "cannot tell which of its node's GPUs to use; start the ranks with mpiexec (PALS), or export "
                "LOCAL_RANK and use torchrun"
            )
        local = _integer(environ, local_key, 0) if local_key else 0
        address = environ.get("MASTER_ADDR") or _pbs_first_host(environ) or _single_host(world, "PMI")
        return _checked(RankEnv(rank, world, local, address, port, "pmi"))
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world = _integer(environ, "SLURM_PROCID"), _integer(environ, "SLURM_NTASKS")
        local = _integer(environ, "SLURM_LOCALID", 0)
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        address = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else _single_host(world, "Slurm"))
        return _checked(RankEnv(rank, world, local, address, port, "slurm"))
    return RankEnv(0, 1, 0, LOCAL_HOST, port, "single")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `frontier[00001-00004]` -> `frontier00001`,
    `nid[001,003]` -> `nid001`, `a,b` -> `a`, `gpu[07-08]-ib,cpu1` -> `gpu07-ib`."""
    first, depth = "", 0
    for character in nodelist.strip():
        if character == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(character, 0)
        first += character
    prefix, bracket, rest = first.partition("[")
    if not bracket:
        return prefix
    ranges, closing, suffix = rest.partition("]")
    start = ranges.split(",")[0].split("-")[0].strip()
    if not closing or not start:
        raise ChemFLError(f"cannot read the node list {nodelist!r}; export MASTER_ADDR=<rank 0's host name>")
    return f"{prefix}{start}{suffix}"


def _pbs_first_host(environ: Mapping[str, str]) -> str | None:
    """PBS lists the job's hosts in $PBS_NODEFILE, rank 0's (mpiexec places rank 0 there) first."""
    nodefile = environ.get("PBS_NODEFILE")
    if not nodefile or not Path(nodefile).is_file():
        return None
    hosts = Path(nodefile).read_text().split()
    return hosts[0] if hosts else None


def _single_host(world: int, launcher: str) -> str:
    if world == 1:
        return LOCAL_HOST
    raise ChemFLError(
        f"{launcher} started {world} ranks but rank 0's host is unknown: export MASTER_ADDR=<rank 0's host "
        "name> in the job script"
    )


def _integer(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in environ and default is not None:
        return default
    try:
        return int(environ[key])
    except ValueError:
        raise ChemFLError(f"environment variable {key} = {environ[key]!r} should be an integer") from None


def _checked(ranks: RankEnv) -> RankEnv:
    if not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise ChemFLError(
            f"{ranks.launcher} says rank {ranks.rank} of {ranks.world_size} (local rank {ranks.local_rank}); "
            "ranks must be 0 <= rank < world size: check the launcher's variables"
        )
    return ranks
