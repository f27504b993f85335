"""Local training: completion-only loss on chat-formatted records, a fixed number of optimizer steps,
in one process or data parallel across the ranks of a process group (the facility trainer).

accelerate handles mixed precision (bf16 autocast on GPUs, fp32 on CPU) and the backward pass;
the model is already on its device, so the loop stays a plain, readable PyTorch loop.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from chemfl.config import Scalar
from chemfl.data_prep.formatting import IGNORE_INDEX
from chemfl.errors import ChemFLError

SCHEDULES = ("constant", "linear", "cosine")
DISTRIBUTED = ("ddp", "fsdp")  # train.distributed: how the facility trainer's ranks hold the base model


@dataclass(frozen=True)
class TrainSpec:
    local_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    max_length: int
    seed: int
    distributed: str = "ddp"

    @classmethod
    def from_config(cls, config: dict[str, Scalar]) -> TrainSpec:
        spec = cls(
            local_steps=int(config["train.local-steps"]),
            batch_size=int(config["train.batch-size"]),
            grad_accum=int(config["train.grad-accum"]),
            lr=float(config["train.lr"]),
            lr_schedule=str(config["train.lr-schedule"]),
            warmup_steps=int(config["train.warmup-steps"]),
            max_length=int(config["train.max-length"]),
            seed=int(config["train.seed"]),
            distributed=str(config["train.distributed"]),
        )
        if spec.lr_schedule not in SCHEDULES:
            raise ChemFLError(f"train.lr-schedule = {spec.lr_schedule!r}; use one of {', '.join(SCHEDULES)}")
        if spec.distributed not in DISTRIBUTED:
            raise ChemFLError(f"train.distributed = {spec.distributed!r}; use one of {', '.join(DISTRIBUTED)}")
        quantization = str(config["model.quantization"])
        if spec.distributed == "fsdp" and quantization != "none":
            raise ChemFLError(
                f"train.distributed = 'fsdp' shards the base weights, but model.quantization = {quantization!r} "
                "(QLoRA) trains on one device: set train.distributed = 'ddp' (and start one rank), or set "
                "model.quantization = 'none' to shard the unquantized model"
            )
        for key, value in (
            ("train.local-steps", spec.local_steps),
            ("train.batch-size", spec.batch_size),
            ("train.grad-accum", spec.grad_accum),
            ("train.max-length", spec.max_length),
        ):
            if value <= 0:
                raise ChemFLError(f"{key} = {value} must be positive")
        if not spec.lr > 0:
            raise ChemFLError(f"train.lr = {spec.lr} must be positive")
        if spec.warmup_steps < 0:
            raise ChemFLError(f"train.warmup-steps = {spec.warmup_steps} must be >= 0")
        return spec

    def for_task(self, local_steps: int, lr_scale: float | None) -> TrainSpec:
        """These settings as one task asks: its optimizer steps, and its learning rate scaled (FedQueue)."""
        return replace(self, local_steps=local_steps, lr=self.lr * (1.0 if lr_scale is None else lr_scale))


@dataclass
class TrainResult:
    loss: float  # mean of the optimizer steps' losses
    steps: int
    seconds: float
    tokens: int  # non-padding tokens through forward and backward (every rank's, data parallel)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest example (right for training, left for generation)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        pad = width - len(example["input_ids"])
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            values = example.get(key, example["input_ids"] if key == "labels" else None)
            batch[key].append([fill] * pad + values if left else values + [fill] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def answer_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, token count) over answer tokens only.

    The output layer runs only where a label is learned: with prompts ~3x longer than answers,
    skipping the vocabulary projection (49k columns for SmolLM2) on prompt positions makes a
    CPU training step ~15-20% faster than `model(**batch).loss`, with the same value.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def sharded_answer_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`answer_token_loss` for a model sharded with FSDP: the same value through the model's own
    forward (FSDP gathers a module's weights in that module's forward hooks, so the decoder cannot be
    called around the root the way `answer_token_loss` does). The output layer runs on every position."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def is_sharded(model) -> bool:
    """Whether `shard_base_weights` sharded this model (its base weights are DTensors)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def shard_base_weights(model, device: torch.device, world_size: int) -> None:
    """train.distributed = "fsdp": shard the frozen base weights over the ranks with FSDP2
    (`fully_shard` on every decoder layer, then at the root), so each rank holds 1/world of them.

    The LoRA matrices are FSDP's ignored parameters: every rank keeps them whole, as under DDP, so the
    adapter enters and leaves the model as before (lora.packed_state, load_packed_state, the trainer's
    broadcast) and their gradients are summed by `DataParallel.sum_gradients`. FSDP itself reduces no
    gradient (the base weights are frozen): nothing is averaged behind the data-parallel sum.
    Every rank of the default process group must call this, on the same model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from chemfl.llm.lora import lora_parameters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mesh = init_device_mesh(device.type, (world_size,))
    ignored = set(lora_parameters(model).values())
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [module for module in base.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ChemFLError(
            f"train.distributed = 'fsdp' found no decoder layers to shard in {type(base).__name__} "
            "(no _no_split_modules); use train.distributed = 'ddp'"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(base, mesh=mesh, ignored_params=ignored)


def example_stream(examples: Sequence[dict | None], seed: int) -> Iterator[dict]:
    """Endless examples in a seeded shuffle per pass; dropped ones (None) are skipped."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        usable = 0
        for index in order:
            example = examples[index]
            if example is not None:
                usable += 1
                yield example
        if usable == 0:
            raise ChemFLError("every training example is longer than train.max-length; raise it")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def batch_order_seed(train_seed: int, batch_order_key: int, partition_id: int) -> int:
    """The seed of a task's batch order: different for every task (round, or asynchronous dispatch;
    protocol.Task.batch_order_key) and facility, reproducible from the seeds."""
    return train_seed * 1_000_003 + batch_order_key * 1_009 + partition_id


def dropout_seed(seed: int, rank: int = 0) -> int:
    """The torch seed of a task's random draws (LoRA dropout masks) on `rank`: a function of the task's
    seed alone, never of what the process ran before. torch seeds its default generator at random
    in every new process (2.13: `torch.initial_seed()` differs from run to run), and a simulation's Ray
    actor trains whichever facility's task comes next, so without it two runs of one seed drift apart
    from their first update. Ranks get their own masks, as in DDP."""
    return (seed * 1_000_003 + rank) % (2**63)


def collective_in_one_buffer(tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], object]) -> None:
    """Apply an in-place collective (all-reduce, broadcast) to `tensors` packed into one fp32 buffer,
    then write the results back: one message instead of one per LoRA matrix (hundreds of small
    messages are latency-bound on any interconnect). fp32 holds bf16 and fp32 values exactly."""
    if not tensors:
        return
    with torch.no_grad():
        buffer = torch.cat([tensor.detach().reshape(-1).to(torch.float32) for tensor in tensors])
        collective(buffer)
        offset = 0
        for tensor in tensors:
            tensor.copy_(buffer[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group: rank `rank` of `world_size`, training one
    model on disjoint examples with DDP's semantics (gradients all-reduced every step, every rank
    applies the same update).

    Examples: every rank draws the same seeded stream; each micro-step takes the next
    batch_size x world_size examples (the global micro-batch) and rank r trains on its block
    [r * batch_size, (r + 1) * batch_size). A step of W ranks with batch b therefore sees exactly the
    examples of one process with batch W * b, which is what makes the two equal.
    """

    rank: int
    world_size: int
    group: object | None = None  # a torch.distributed ProcessGroup; None: the default group

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ChemFLError(f"rank {self.rank} is not in a world of {self.world_size}")

    def sum_(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` by its sum over the ranks (in place)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=self.group)

    def sum_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Every parameter's gradient summed over the ranks, in one all-reduce."""
        for parameter in parameters:
            if parameter.grad is None:  # every rank must send the same buffer layout
                parameter.grad = torch.zeros_like(parameter)
        if self.world_size > 1:
            collective_in_one_buffer([p.grad for p in parameters], self.sum_)

    def own_block(self, global_batch: list[dict]) -> list[dict]:
        """This rank's contiguous block of a global micro-batch of batch_size x world_size examples."""
        size = len(global_batch) // self.world_size
        return global_batch[self.rank * size : (self.rank + 1) * size]


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens `answer_token_loss` counts: learned labels after the first position."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_local(
    model,
    examples: Sequence[dict | None],
    spec: TrainSpec,
    pad_id: int,
    seed: int,
    accelerator,
    data_parallel: DataParallel | None = None,
) -> TrainResult:
    """`spec.local_steps` optimizer steps of AdamW over the trainable (LoRA) parameters.

    Alone (`data_parallel` None), each micro-batch's loss is its mean over its answer tokens divided
    by grad_accum (the ClientApp's rule, unchanged).

    Data parallel, each rank trains on its block of every global micro-batch (see DataParallel) and
    divides its micro-batches' summed cross-entropy by the answer tokens of the whole optimizer step,
    counted over every rank and micro-batch (all-reduced before any backward). The gradients summed
    over the ranks are then exactly those of one process taking the token mean of the step's
    examples, whatever the world size; the norm is clipped after that sum, so every rank applies the
    same update and the replicas stay equal. With grad_accum = 1 the two rules give the same number;
    with grad_accum > 1 the data-parallel one weighs micro-batches by their answer tokens instead of
    equally. The reported loss is the mean over steps of the step loss summed over ranks; tokens are
    every rank's. Dropout masks are drawn per rank, as in DDP.

    Every random draw (dropout) comes from `seed` (and the rank): the same task trains the same
    whatever the process did before it (`dropout_seed`).
    """
    if not len(examples):
        raise ChemFLError("this node has no training examples")
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.lr_schedule, spec.warmup_steps, spec.local_steps)
    )
    stream = example_stream(examples, seed)
    world = data_parallel.world_size if data_parallel is not None else 1
    loss_of = sharded_answer_token_loss if is_sharded(model) else answer_token_loss
    torch.manual_seed(dropout_seed(seed, data_parallel.rank if data_parallel is not None else 0))
    model.train()
    losses, tokens = [], 0
    started = time.perf_counter()
    for _ in range(spec.local_steps):
        micro_batches = []
        for _ in range(spec.grad_accum):
            picked = [next(stream) for _ in range(spec.batch_size * world)]
            picked = data_parallel.own_block(picked) if data_parallel is not None else picked
            micro_batches.append({k: v.to(device) for k, v in collate(picked, pad_id).items()})
        if data_parallel is not None:
            step_tokens = torch.tensor(float(sum(answer_tokens(batch) for batch in micro_batches)), device=device)
            data_parallel.sum_(step_tokens)
        step_loss = 0.0
        for batch in micro_batches:
            with accelerator.autocast():
                loss_sum, count = loss_of(model, batch)
                if data_parallel is not None:
                    loss = loss_sum / step_tokens.clamp(min=1)
                else:
                    loss = loss_sum / max(count, 1) / spec.grad_accum
            accelerator.backward(loss)
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if data_parallel is not None:
            data_parallel.sum_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    if data_parallel is not None:
        totals = torch.tensor([*losses, float(tokens)], dtype=torch.float64, device=device)
        data_parallel.sum_(totals)
        losses, tokens = totals[:-1].tolist(), int(totals[-1].item())
    return TrainResult(sum(losses) / len(losses), spec.local_steps, time.perf_counter() - started, tokens)
