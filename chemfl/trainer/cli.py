"""`chemfl trainer` (also `python -m chemfl.trainer`): start one rank of the facility trainer.

    chemfl trainer --secret-file $S --new-secret        # once per job, before the ranks start
    torchrun --nproc-per-node 4 -m chemfl.trainer --run-config recipes/laptop.toml \\
        --data-path /data/partitions/polaris --socket /tmp/$USER/chemfl/trainer.sock --secret-file $S
    mpiexec -n 8 --ppn 4 chemfl trainer ...              # PMI / PALS (Polaris, Aurora)
    srun --ntasks-per-node 8 chemfl trainer ...          # Slurm (Frontier, Perlmutter)

This module only declares the options and runs the checks that need no torch (the rank, the
secret file, the socket path), so mistakes in a job script are reported in a fraction of a second;
chemfl.trainer.service, which loads torch and the model, is imported when a rank starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from chemfl.errors import ChemFLError
from chemfl.trainer.ranks import BACKENDS, rank_env

DEFAULT_COLLECTIVE_TIMEOUT = 600.0


def data_slice(text: str) -> tuple[int, int]:
    """`--data-slice i/n`, checked as node config data-slice is (chemfl.data_prep.shards.parse_slice)."""
    from chemfl.data_prep.shards import parse_slice

    try:
        return parse_slice(text)
    except ChemFLError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-config", metavar="RECIPE.toml", help="the run's recipe (required to serve)")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one knob of the recipe, e.g. --set train.batch-size=8 (repeatable)",
    )
    parser.add_argument(
        "--data-path", type=Path, metavar="DIR", help="the facility's shard folder, partitions/<facility> of a build"
    )
    parser.add_argument(
        "--data-slice", type=data_slice, metavar="i/n", help="i/n: train on records i, i+n, ... of the shard"
    )
    parser.add_argument("--socket", type=Path, metavar="PATH", help="the node-local Unix socket rank 0 listens on")
    parser.add_argument("--secret-file", type=Path, required=True, metavar="PATH", help="the job's secret (mode 0600)")
    parser.add_argument(
        "--new-secret", action="store_true", help="write a fresh secret to --secret-file (mode 0600) and exit"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="collectives: auto = nccl with CUDA/ROCm, xccl (else ccl) with Intel XPUs, else gloo",
    )
    parser.add_argument(
        "--job-end-time",
        type=float,
        default=None,
        metavar="EPOCH",
        help="when the batch job ends (epoch seconds; default CHEMFL_JOB_END_TIME, SLURM_JOB_END_TIME or "
        "PBS): tasks that cannot finish before are refused",
    )
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=DEFAULT_COLLECTIVE_TIMEOUT,
        metavar="SECONDS",
        help="a collective waiting longer fails and the trainer exits; also bounds one evaluation, which rank 0 "
        f"runs alone (default {DEFAULT_COLLECTIVE_TIMEOUT:g})",
    )


def register(verbs: argparse._SubParsersAction) -> None:
    trainer = verbs.add_parser(
        "trainer",
        help="one rank of a facility's warm, data-parallel trainer (serves the ClientApp relay)",
        description="Start one rank (torchrun, mpiexec or srun start one per GPU): every rank loads the model "
        "once, rank 0 serves train and evaluate requests on --socket, and every task trains data parallel "
        "over all ranks.",
    )
    add_arguments(trainer)
    trainer.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    started = _process_start_time()
    from chemfl.trainer.channel import check_socket_path, read_secret, write_secret

    if args.new_secret:
        print(f"wrote a new secret to {write_secret(args.secret_file)}")
        return 0
    needed = {"--run-config": args.run_config, "--data-path": args.data_path, "--socket": args.socket}
    missing = [flag for flag, value in needed.items() if value is None]
    if missing:
        raise ChemFLError(f"chemfl trainer needs {', '.join(missing)} to serve (see chemfl trainer --help)")
    from chemfl.config import resolve
    from chemfl.data_prep.cli import load_run_config
    from chemfl.simulation import parse_overrides

    config = resolve({**load_run_config(args.run_config), **parse_overrides(args.overrides)})
    ranks = rank_env()
    die_with_parent(launched=ranks.world_size > 1)
    secret = b""
    if ranks.rank == 0:  # the socket's side: checked before torch loads
        secret = read_secret(args.secret_file)
        check_socket_path(args.socket)
    from chemfl.trainer.service import TrainerSettings, run_trainer

    settings = TrainerSettings(
        config,
        args.data_path,
        args.data_slice,
        args.socket,
        secret,
        args.backend,
        args.job_end_time,
        args.collective_timeout,
    )
    return run_trainer(settings, ranks, started)


def die_with_parent(launched: bool) -> None:
    """A rank ends when the process that started it does (torchrun, mpiexec's or srun's daemon).
    torchrun puts every rank in a session of its own, so a job script that kills torchrun's process
    group would otherwise leave the ranks serving the socket until the job ends. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if launched and os.getppid() == 1:  # the launcher died before the request took effect
        raise ChemFLError("the trainer's launcher (torchrun, mpiexec or srun) exited before this rank started")


def _process_start_time() -> float:
    """When this process started (epoch seconds), so `trainer ready in N s` counts the interpreter's
    start and the imports too."""
    import psutil  # accelerate's dependency

    return psutil.Process().create_time()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chemfl trainer", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ChemFLError as error:
        print(f"chemfl trainer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
