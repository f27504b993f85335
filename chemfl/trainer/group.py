"""The trainer's process group: the backend, each rank's device, initialisation with a collective
timeout, and what rank 0 broadcasts (the next command, the adapter).

Collective timeout: every collective (and the initial rendezvous) fails after `timeout` seconds
instead of waiting forever for a rank that hangs. A rank that dies closes its connections, and the
others' next collective fails at once (gloo; NCCL reports it through its watchdog). Rank 0 sends a
heartbeat command while idle, more often than the timeout, so the other ranks' wait for the next
command never runs into it and a rank that died between tasks is noticed within a heartbeat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from chemfl.errors import ChemFLError
from chemfl.llm.training import DataParallel, collective_in_one_buffer
from chemfl.trainer.ranks import BACKENDS, RankEnv

COMMANDS = ("train", "ping", "heartbeat", "shutdown")


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _register_ccl() -> bool:
    """oneCCL's bindings register the "ccl" backend when imported (Intel's older route to XPUs)."""
    try:
        import oneccl_bindings_for_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(requested: str) -> str:
    """`auto`: nccl where CUDA is available (ROCm builds too: torch calls RCCL "nccl"), xccl where
    Intel XPUs are (ccl when this torch has no xccl), else gloo. An explicit accelerator backend on a
    machine without those accelerators is an error that says so."""
    if requested not in BACKENDS:
        raise ChemFLError(f"--backend {requested!r}: use one of {', '.join(BACKENDS)}")
    cuda, xpu = torch.cuda.is_available(), _xpu_available()
    if requested == "auto":
        requested = "nccl" if cuda else "xccl" if xpu else "gloo"
    if requested == "nccl" and not cuda:
        raise ChemFLError(
            "--backend nccl needs CUDA (or ROCm) GPUs, but torch sees none on this node "
            "(torch.cuda.is_available() is False): run the ranks on GPU nodes with a CUDA/ROCm build of torch, "
            "or use --backend gloo on CPUs"
        )
    if requested in ("xccl", "ccl") and not xpu:
        raise ChemFLError(
            f"--backend {requested} needs Intel GPUs (XPUs), but torch sees none on this node: run the ranks on "
            "XPU nodes with an XPU build of torch, or use --backend gloo on CPUs"
        )
    if requested == "xccl" and not dist.is_backend_available("xccl"):
        requested = "ccl"
    if requested == "ccl" and not _register_ccl():
        raise ChemFLError(
            "no collective backend for Intel GPUs: this torch has no xccl (torch >= 2.8 XPU builds have it) and "
            "oneccl_bindings_for_pytorch is not installed; load the facility's frameworks module"
        )
    return requested


def rank_device(local_rank: int) -> torch.device:
    """The device of the rank with this local rank: the node's GPU number `local_rank`, or the only
    one visible when the launcher pins one GPU per rank (CUDA_VISIBLE_DEVICES, ZE_AFFINITY_MASK);
    cuda (NVIDIA and ROCm), then xpu (Intel), else the CPU."""
    for kind, module in (("cuda", torch.cuda), ("xpu", getattr(torch, "xpu", None))):
        if module is None or not module.is_available():
            continue
        count = module.device_count()
        if count == 1:
            return torch.device(kind, 0)
        if local_rank >= count:
            raise ChemFLError(
                f"local rank {local_rank} asks for {kind}:{local_rank}, but this node shows {count} {kind} devices: "
                f"start at most {count} ranks per node (one per GPU), or pin one GPU per rank"
            )
        return torch.device(kind, local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class Command:
    """What rank 0 tells the other ranks to do next (broadcast before any work)."""

    kind: str  # one of COMMANDS
    steps: int = 0  # train: optimizer steps
    seed: int = 0  # train: the batch order's seed
    lr_scale: float | None = None  # train: the task's learning-rate scale (None: train.lr)


class RankGroup:
    """This rank in the initialised process group, on its device."""

    def __init__(self, ranks: RankEnv, backend: str, device: torch.device):
        self.ranks = ranks
        self.backend = backend
        self.device = device
        # broadcast_object_list moves its pickles through tensors on this device.
        self._object_device = torch.device("cpu") if backend == "gloo" else device

    @classmethod
    def start(cls, ranks: RankEnv, requested_backend: str, timeout: float) -> RankGroup:
        """Choose the backend and device, export torchrun's variables (accelerate reads them too)
        and join the group. World size 1 uses an in-memory store: no port is opened."""
        backend = choose_backend(requested_backend)
        device = rank_device(ranks.local_rank)
        if device.type in ("cuda", "xpu"):
            getattr(torch, device.type).set_device(device)
        os.environ.update(ranks.torch_environ())
        try:
            if ranks.world_size == 1:
                dist.init_process_group(
                    backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout)
                )
            else:
                dist.init_process_group(
                    backend,
                    init_method="env://",
                    rank=ranks.rank,
                    world_size=ranks.world_size,
                    timeout=timedelta(seconds=timeout),
                )
        except (RuntimeError, ValueError) as error:
            raise ChemFLError(
                f"rank {ranks.rank} of {ranks.world_size} could not join the process group at "
                f"{ranks.master_addr}:{ranks.master_port} with {backend} within {timeout:g} s ({error}); check that "
                "every rank started, MASTER_ADDR and MASTER_PORT, and --backend"
            ) from error
        return cls(ranks, backend, device)

    @property
    def data_parallel(self) -> DataParallel:
        return DataParallel(self.ranks.rank, self.ranks.world_size)

    def broadcast_command(self, command: Command | None) -> Command:
        """Rank 0 passes its command; every rank returns it."""
        box = [command]
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        return box[0]

    def broadcast_adapter(self, model) -> None:
        """Every rank's LoRA tensors become rank 0's, so the replicas start each task equal."""
        adapter = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
        collective_in_one_buffer(adapter, lambda buffer: dist.broadcast(buffer, src=0))

    def close(self) -> None:
        dist.destroy_process_group()
