"""The trainer's ranks: every rank loads its replica once; rank 0 serves the channel and tells the
other ranks what to do; they follow until told to stop.

Failures. A request that fails rank 0's checks (run config, FFA-LoRA digest, adapter shapes,
walltime, missing test set) is refused with the reason before any other rank is involved, and the
trainer keeps serving. Once the other ranks were told to work, any failure (a rank died, a
collective timed out, an exception on any rank) is replied to the request in flight when rank 0
still can, and the whole trainer exits non-zero at once so that the job script can end the job:
the ranks can no longer be assumed in step. Those exits use os._exit: tearing down a process group
whose peers are gone can block (NCCL), and a job must never hang on its way out. SIGTERM on rank 0
(the job ending, or torchrun stopping the ranks after one failed) is handled the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chemfl.config import Scalar
from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import Shard, load_slice, load_test_set
from chemfl.errors import ChemFLError
from chemfl.hpc.walltime import remaining_walltime
from chemfl.llm.evaluation import evaluate_at_facility
from chemfl.llm.lora import frozen_a_digest, load_packed_state, packed_state
from chemfl.llm.model import ModelSpec
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainResult, TrainSpec, batch_order_seed, shard_base_weights, train_local
from chemfl.protocol import NodeConfig, Task, TrainReport, task_local_steps
from chemfl.trainer.admission import StepTimeEstimate, check_run_config
from chemfl.trainer.channel import TrainerConnection, TrainerListener, TrainerReply, TrainerRequest
from chemfl.trainer.group import Command, RankGroup
from chemfl.trainer.ranks import RankEnv

logger = logging.getLogger("chemfl.trainer")

HEARTBEAT_SECONDS = 10.0
CHANNEL_SECONDS = 60.0


@dataclass(frozen=True)
class TrainerSettings:
    """Everything `chemfl trainer` was started with, checked."""

    config: dict[str, Scalar]  # the resolved run config (recipe + --set)
    data_path: Path  # the facility's shard folder
    data_slice: tuple[int, int] | None  # (i, n): records i, i+n, ... of the shard's training set
    socket_path: Path
    secret: bytes  # rank 0's; empty on the other ranks
    backend: str
    job_end_time: float | None
    collective_timeout: float

    @property
    def heartbeat(self) -> float:
        """Seconds rank 0 waits for a client before it sends the other ranks a heartbeat."""
        return min(HEARTBEAT_SECONDS, self.collective_timeout / 4)

    @property
    def channel_timeout(self) -> float:
        """Seconds one handshake or one request may take to arrive: a client that connects and stalls
        keeps rank 0 from its heartbeats, so together they stay well inside the collective timeout."""
        return min(CHANNEL_SECONDS, self.collective_timeout / 8)


class RankReplica:
    """One rank's share of the trainer: the model and adapter on its device, loaded once, the
    shard's examples and the run's training settings."""

    def __init__(self, config: dict[str, Scalar], shard: Shard, group: RankGroup):
        self.config = config
        self.shard = shard
        self.group = group
        self.spec = TrainSpec.from_config(config)
        self.session = get_session(config, group.device)
        if self.sharded:
            shard_base_weights(self.session.model, group.device, group.ranks.world_size)
            logger.info("base weights sharded over %d ranks (train.distributed = fsdp)", group.ranks.world_size)
        self.examples = LazyExamples(
            self.session.tokenizer, shard.train, self.spec.max_length, str(config["model.system-prompt"])
        )

    @property
    def sharded(self) -> bool:
        """train.distributed = "fsdp" over several ranks: each rank holds 1/world of the base weights, so
        the model runs only when every rank runs it (a forward gathers each layer's weights)."""
        return self.spec.distributed == "fsdp" and self.group.ranks.world_size > 1

    def train(self, command: Command) -> TrainResult:
        """Start from rank 0's adapter, then `command.steps` data-parallel steps (every rank calls this)."""
        self.group.broadcast_adapter(self.session.model)
        spec = self.spec.for_task(command.steps, command.lr_scale)
        logger.info("training %d steps", command.steps)
        pad_id = self.session.tokenizer.pad_token_id
        return train_local(
            self.session.model,
            self.examples,
            spec,
            pad_id,
            command.seed,
            self.session.accelerator,
            self.group.data_parallel,
        )


@dataclass(frozen=True)
class Admitted:
    """A request that passed rank 0's checks, its adapter loaded into rank 0's model."""

    kind: str
    command: Command | None = None  # what every rank does; None: rank 0 answers alone
    on_test_set: bool = False  # evaluate: the held-out test set instead of the validation shard


class RankZero:
    """Rank 0: admits each request, tells the other ranks what to do, replies."""

    def __init__(self, replica: RankReplica, settings: TrainerSettings):
        self.replica = replica
        self.settings = settings
        self.estimate = StepTimeEstimate()
        self._test_records: list[dict] | None = None

    @property
    def model(self):
        return self.replica.session.model

    def test_set(self) -> list[dict]:
        """The held-out test set beside the shard (eval.at = this facility), read and checked once."""
        if self._test_records is None:
            self._test_records = load_test_set(self.settings.data_path)
        return self._test_records

    def serve(self, listener: TrainerListener) -> None:
        """Answer requests one at a time until a shutdown request; heartbeats while idle."""
        while True:
            connection = listener.accept(timeout=self.settings.heartbeat)
            if connection is None:
                self.replica.group.broadcast_command(Command("heartbeat"))
                continue
            with connection:
                if self.handle(connection) == "shutdown":
                    return

    def handle(self, connection: TrainerConnection) -> str | None:
        """One request: refused, answered by rank 0 alone (its failure is the request's), or
        answered by every rank (a failure is the trainer's: replied, then raised). Its kind, or None."""
        try:
            request = connection.receive_request()
            admitted = self.admit(request)
        except (ChemFLError, KeyError, ValueError, TypeError, OSError) as error:
            logger.warning("refused a request: %s", error)
            _send_quietly(connection.send_error, f"refused: {error}")
            return None
        logger.info("%s request admitted", admitted.kind)
        if admitted.command is None:
            try:
                reply = self.answer(admitted)
            except Exception as error:
                logger.exception("%s failed", admitted.kind)
                _send_quietly(connection.send_error, f"{admitted.kind} failed on the trainer: {error}")
                return admitted.kind
        else:
            try:
                reply = self.answer(admitted)
            except BaseException as error:
                _send_quietly(
                    connection.send_error,
                    f"{admitted.kind} failed and the trainer stops ({type(error).__name__}: {error}); a rank died, "
                    "a collective failed or the job is ending: see the trainer's log",
                )
                raise
        _send_quietly(connection.send_reply, reply)
        return admitted.kind

    def admit(self, request: TrainerRequest) -> Admitted:
        """Everything that can refuse a request, checked before any other rank is involved."""
        if request.kind in ("ping", "shutdown"):
            return Admitted(request.kind, Command(request.kind))
        check_run_config(self.replica.config, request.run_config)
        task = Task.from_config(request.config)
        lora_spec = self.replica.session.lora_spec
        if lora_spec.freeze_a and task.lora_a_digest != frozen_a_digest(self.model):
            raise ChemFLError(
                "this trainer's frozen LoRA A differs from the server's; both must use the same model.name, "
                "lora.* settings and lora.seed"
            )
        admitted = Admitted(request.kind)
        if request.kind == "train":
            steps = task_local_steps(task.local_steps, self.replica.spec.local_steps)
            self.estimate.check_fits(steps, remaining_walltime(self._node_config()))
            seed = batch_order_seed(self.replica.spec.seed, task.batch_order_key, self.replica.shard.partition_id)
            admitted = Admitted("train", Command("train", steps, seed, task.lr_scale))
        elif self.replica.sharded:
            raise ChemFLError(
                "this trainer shards its base model over its ranks (train.distributed = 'fsdp') and evaluates on "
                "rank 0 alone: evaluate on the server (eval.at = 'server', strategy.fraction-evaluate = 0) or train "
                "with train.distributed = 'ddp'"
            )
        elif task.evaluate_on == Task.TEST_SET:
            self.test_set()  # read now: a missing test set is a refusal
            admitted = Admitted("evaluate", on_test_set=True)
        load_packed_state(self.model, lora_spec, request.arrays, task.adapter_layout)
        return admitted

    def answer(self, admitted: Admitted) -> TrainerReply:
        if admitted.command is not None:
            self.replica.group.broadcast_command(admitted.command)
        facility = self.replica.shard.facility
        if admitted.kind == "train":
            return self._train(admitted.command)
        if admitted.kind == "evaluate":
            return self._evaluate(admitted.on_test_set)
        return TrainerReply({}, {"world-size": self.replica.group.ranks.world_size}, facility)

    def _train(self, command: Command) -> TrainerReply:
        examples = self.replica.examples
        cut_before = (examples.report.truncated, examples.report.dropped)
        result = self.replica.train(command)
        self.estimate.observe(result.steps, result.seconds)
        logger.info("trained %d steps in %.1f s, loss %.4f", result.steps, result.seconds, result.loss)
        if (examples.report.truncated, examples.report.dropped) != cut_before:  # stays here: the trainer's log
            logger.warning(
                "%d examples truncated, %d dropped at train.max-length = %d so far",
                examples.report.truncated,
                examples.report.dropped,
                self.replica.spec.max_length,
            )
        report = TrainReport(len(examples), result.loss, result.steps, result.seconds, result.tokens_per_second)
        arrays = packed_state(self.model, self.replica.session.lora_spec)
        return TrainerReply(arrays, report.to_metrics(), self.replica.shard.facility)

    def _evaluate(self, on_test_set: bool) -> TrainerReply:
        """As the ClientApp's evaluate handler: loss on the validation shard (generation metrics with
        eval.node-generate-per-task), or the central evaluation on the test set."""
        records = self.test_set() if on_test_set else self.replica.shard.validation
        result, report = evaluate_at_facility(self.replica.session, self.replica.config, records, on_test_set)
        return TrainerReply({}, report.to_metrics(), self.replica.shard.facility, result if on_test_set else None)

    def _node_config(self) -> dict:
        end = self.settings.job_end_time
        return {} if end is None else {NodeConfig.JOB_END_TIME: end}


def _send_quietly(send, message) -> None:
    """A reply to a client that may have gone meanwhile (its relay was stopped): logged, not raised."""
    try:
        send(message)
    except OSError as error:
        logger.warning("could not reply: %s", error)


def follow_rank_zero(replica: RankReplica) -> None:
    """The other ranks: wait for rank 0's next command and do it, until shutdown."""
    while True:
        command = replica.group.broadcast_command(None)
        if command.kind == "shutdown":
            return
        if command.kind == "train":
            replica.train(command)


class Stopped(Exception):
    """SIGTERM reached rank 0: the job is ending, or the launcher stops the ranks after one failed."""


def _raise_stopped(signum, frame) -> None:
    raise Stopped(f"received {signal.Signals(signum).name}")


def configure_logging(ranks: RankEnv) -> None:
    """ChemFL's log lines on stderr, each naming its rank: the ranks' logs interleave in one job log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s rank {ranks.rank}/{ranks.world_size} %(name)s %(levelname)s: %(message)s")
    )
    chemfl_logger = logging.getLogger("chemfl")
    chemfl_logger.addHandler(handler)
    chemfl_logger.setLevel(logging.INFO)


def run_trainer(settings: TrainerSettings, ranks: RankEnv, started: float) -> int:
    """One rank of the trainer, from joining the group to shutdown (0); failures never return."""
    TrainSpec.from_config(settings.config)  # train.* knobs (train.distributed with model.quantization)
    if ModelSpec.from_config(settings.config).quantization != "none" and ranks.world_size > 1:
        raise ChemFLError(
            f"model.quantization = {settings.config['model.quantization']!r} (QLoRA) trains on one device, but "
            f"{ranks.world_size} ranks were started: start the trainer as one rank, or set model.quantization = 'none'"
        )
    configure_logging(ranks)
    if ranks.rank == 0:
        signal.signal(signal.SIGTERM, _raise_stopped)
    group = RankGroup.start(ranks, settings.backend, settings.collective_timeout)
    logger.info("pid %d on %s, %s backend, started by %s", os.getpid(), group.device, group.backend, ranks.launcher)
    listener = None
    try:
        replica = RankReplica(settings.config, load_slice(settings.data_path, settings.data_slice), group)
        if ranks.rank != 0:
            follow_rank_zero(replica)
        else:
            listener = TrainerListener(settings.socket_path, settings.secret, settings.channel_timeout)
            print(f"trainer ready in {time.time() - started:.1f} s", flush=True)
            logger.info("serving %s on %s (%d ranks)", replica.shard.facility, settings.socket_path, ranks.world_size)
            RankZero(replica, settings).serve(listener)
    except ChemFLError as error:  # a setting or a file to fix: the message says what
        logger.error("%s", error)
        _exit_now(2, listener)
    except BaseException:
        logger.exception("the trainer stops")
        _exit_now(1, listener)
    if listener is not None:
        listener.close()
    group.close()
    logger.info("shut down")
    return 0


def _exit_now(code: int, listener: TrainerListener | None) -> None:
    """Remove the socket and leave without tearing down the process group (see the module
    docstring): the job script sees the exit status at once."""
    if listener is not None:
        listener.close()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
