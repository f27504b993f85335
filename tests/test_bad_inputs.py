"""Bad input that labs really have, fed to the real entry points.

Each case must be a clear ChemFLError (or, for a `chemfl ...` command run in-process, a
`chemfl: error:` line and a non-zero exit) that names the problem, raised before any work, with
nothing written or changed in the folder the case works in. Cases marked `gap` are known not to
be clear errors yet: they run as strict xfails, so fixing one turns its XPASS into a failure that
asks for the mark to go.

docs/bad-inputs.md is generated from these cases: .venv/bin/python bench/bad_inputs_table.py
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from chemfl.config import DEFAULTS, Scalar, resolve
from chemfl.errors import ChemFLError

REPO = Path(__file__).resolve().parents[1]
Call = Callable[[], object]  # runs the entry point; a CLI call returns its exit code


@dataclass(frozen=True)
class Case:
    section: str
    bad: str  # the bad input, in words
    entry: str  # the entry point it goes through
    setup: Callable[[Path], Call]  # prepares the working folder, returns the call
    expect: str  # what the first line of the message must say
    gap: str = ""  # not a clear error yet: what happens instead

    @property
    def id(self) -> str:
        return f"{self.section}: {self.bad}"


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ChemFLError", "chemfl: error" (CLI), "no error", or the raw exception's type
    message: str  # the first line of the message ("" when there is none)
    untouched: bool  # the working folder is exactly as it was before the call

    @property
    def clear(self) -> bool:
        return self.kind in ("ChemFLError", "chemfl: error")


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder`: files with their bytes, folders as None."""
    return {
        str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(folder.rglob("*"))
    }


def _work_started(*args, **kwargs):
    raise AssertionError("work started: the simulation was launched")


def attempt(case: Case, workdir: Path) -> Outcome:
    """Run one case in `workdir` (an empty folder); what came of it."""
    call = case.setup(workdir)
    before = tree(workdir)
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch("chemfl.simulation.simulate", _work_started),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            result = call()
        except ChemFLError as error:
            kind, message = "ChemFLError", str(error)
        except (Exception, SystemExit) as error:
            kind, message = type(error).__name__, str(error)
        else:
            lines = [line for line in err.getvalue().splitlines() if line.startswith("chemfl: error: ")]
            if isinstance(result, int) and result != 0 and lines:
                kind, message = "chemfl: error", lines[0]
            else:
                kind, message = "no error", f"returned {result!r}"
    message = message.strip().splitlines()[0] if message.strip() else ""
    return Outcome(kind, message, tree(workdir) == before)


def cli(*argv: str | Path) -> Call:
    from chemfl.cli import main

    return lambda: main([str(arg) for arg in argv])


# --- 1. every recipe key given a value of the wrong type (generated from DEFAULTS) ---------------


def wrong_type(default: Scalar) -> Scalar:
    if isinstance(default, bool):
        return "yes"
    if isinstance(default, int):
        return 2.5
    if isinstance(default, float):
        return "0.5"
    return 7


def wrong_type_case(key: str, default: Scalar) -> Case:
    value = wrong_type(default)
    return Case(
        "recipe key of the wrong type",
        f"{key} = {value!r}",
        "chemfl.config.resolve",
        lambda workdir: lambda: resolve({key: value}),
        f"config key '{key}' = {value!r} should be a {type(default).__name__}",
    )


def recipe(workdir: Path, text: str) -> Path:
    path = workdir / "recipe.toml"
    path.write_text(text)
    return path


TYPE_CASES = [wrong_type_case(key, default) for key, default in DEFAULTS.items()] + [
    Case(
        "recipe key of the wrong type",
        'lora.r = "16" in a recipe',
        "chemfl simulate RECIPE",
        lambda w: cli("simulate", recipe(w, 'lora.r = "16"\n'), "--app", REPO),
        "chemfl: error: config key 'lora.r' = '16' should be a int",
    ),
    Case(
        "recipe key of the wrong type",
        "data.seed = 1.5 in a recipe",
        "chemfl data build --run-config RECIPE",
        lambda w: cli("data", "build", "--run-config", recipe(w, "data.seed = 1.5\n"), "--out", w / "out"),
        "chemfl: error: config key 'data.seed' = 1.5 should be a int",
    ),
    Case(
        "recipe key of the wrong type",
        "--set strategy.num-versions=many",
        "chemfl simulate RECIPE --set",
        lambda w: cli("simulate", recipe(w, ""), "--app", REPO, "--set", "strategy.num-versions=many"),
        "chemfl: error: config key 'strategy.num-versions' = 'many' should be a int",
    ),
    Case(
        "recipe key of the wrong type",
        "a misspelt key (data.max_molecules)",
        "chemfl.config.resolve",
        lambda w: lambda: resolve({"data.max_molecules": 60}),
        "unknown config key(s) ['data.max_molecules']",
    ),
]


# --- 2. values outside a key's domain, through check_run_config (every spec of a run) -------------

FACILITIES = ("polaris", "aurora", "frontier", "perlmutter")


def each(value: float) -> str:
    return ",".join(f"{name}={value}" for name in FACILITIES)


VIRTUAL = {  # a valid emulated campaign, to vary one emulation knob at a time
    "emulation.virtual-time": True,
    "emulation.seconds-per-step": each(1),
    "emulation.walltime": each(3600),
    "emulation.queue-median": each(60),
    "emulation.startup-seconds": each(10),
}
FEDBUFF = {"strategy.name": "fedbuff"}
WALLTIME_AWARE = {"strategy.name": "walltime-aware"}

# (overrides, what the message must say, gap: "" when it is a clear error)
DOMAIN: dict[str, tuple[dict[str, Scalar], str, str]] = {
    "data.source = 'hub'": ({"data.source": "hub"}, "unknown data.source 'hub'", ""),
    "data.partition-scheme = 'round-robin'": (
        {"data.partition-scheme": "round-robin"},
        "unknown partition scheme 'round-robin'",
        "",
    ),
    "data.tasks names an unknown task": ({"data.tasks": "name_conversion-i2s,logp"}, "unknown task(s) ['logp']", ""),
    "data.test-fraction = 0": ({"data.test-fraction": 0.0}, "must each be in (0, 1)", ""),
    "data.test-fraction + data.validation-fraction = 1": (
        {"data.test-fraction": 0.5, "data.validation-fraction": 0.5},
        "add up to less than 1",
        "",
    ),
    "data.max-molecules = 0": ({"data.max-molecules": 0}, "data.max-molecules = 0 must be positive", ""),
    "data.max-per-task = -1": ({"data.max-per-task": -1}, "data.max-per-task = -1 must be positive", ""),
    "data.dirichlet-alpha = 0": (
        {"data.partition-scheme": "dirichlet", "data.dirichlet-alpha": 0.0},
        "data.dirichlet-alpha = 0.0 must be > 0",
        "",
    ),
    "data.facilities with an upper-case name": ({"data.facilities": "Polaris"}, "facility name 'Polaris'", ""),
    "data.facilities naming one twice": ({"data.facilities": "polaris,polaris"}, "names a facility twice", ""),
    "data.sizes not numbers": (
        {"data.partition-scheme": "sizes", "data.sizes": "4,two,1,1"},
        "must be numbers",
        "",
    ),
    "data.task-map entry without '='": (
        {"data.partition-scheme": "by-task", "data.task-map": "name_conversion-i2s"},
        "is not 'task=facility'",
        "",
    ),
    "model.quantization = 'int3'": ({"model.quantization": "int3"}, "model.quantization = 'int3'", ""),
    "lora.r = 0": ({"lora.r": 0}, "lora.r = 0 must be a positive rank", ""),
    "lora.r = -8": ({"lora.r": -8}, "lora.r = -8 must be a positive rank", ""),
    "lora.alpha = 0": ({"lora.alpha": 0}, "lora.alpha", ""),
    "lora.dropout = 1.5": ({"lora.dropout": 1.5}, "lora.dropout", ""),
    "lora.target-modules = ''": (
        {"lora.target-modules": ""},
        "lora.target-modules",
        "",
    ),
    "lora.aggregation = 'mean'": ({"lora.aggregation": "mean"}, "lora.aggregation = 'mean'", ""),
    "train.local-steps = 0": ({"train.local-steps": 0}, "train.local-steps = 0 must be positive", ""),
    "train.batch-size = 0": ({"train.batch-size": 0}, "train.batch-size = 0 must be positive", ""),
    "train.grad-accum = 0": ({"train.grad-accum": 0}, "train.grad-accum = 0 must be positive", ""),
    "train.max-length = 0": ({"train.max-length": 0}, "train.max-length = 0 must be positive", ""),
    "train.lr = 0": ({"train.lr": 0.0}, "train.lr = 0.0 must be positive", ""),
    "train.lr = -0.001": ({"train.lr": -0.001}, "train.lr = -0.001 must be positive", ""),
    "train.lr-schedule = 'cosine-restarts'": (
        {"train.lr-schedule": "cosine-restarts"},
        "train.lr-schedule = 'cosine-restarts'",
        "",
    ),
    "train.warmup-steps = -1": ({"train.warmup-steps": -1}, "train.warmup-steps", ""),
    "train.distributed = 'zero3'": (
        {"train.distributed": "zero3"},
        "train.distributed = 'zero3'; use one of ddp, fsdp",
        "",
    ),
    "train.distributed = 'fsdp' with model.quantization = '4bit'": (
        {"train.distributed": "fsdp", "model.quantization": "4bit"},
        "train.distributed = 'fsdp' shards the base weights, but model.quantization = '4bit'",
        "",
    ),
    "strategy.name = 'fedprox'": ({"strategy.name": "fedprox"}, "unknown strategy.name 'fedprox'", ""),
    "strategy.baseline-steps = -1": (
        {"strategy.name": "local", "strategy.baseline-steps": -1},
        "strategy.baseline-steps = -1 must be >= 0",
        "",
    ),
    "strategy.baseline-match = 'fedqueue' (sizes its own tasks)": (
        {"strategy.name": "centralized", "strategy.baseline-match": "fedqueue"},
        "strategy.baseline-match = 'fedqueue'; use one of fedavg, fedbuff, fedasync, or set strategy.baseline-steps",
        "",
    ),
    "eval.at = a facility with a baseline": (
        {"strategy.name": "centralized", "eval.at": "polaris"},
        "the centralized baseline trains and evaluates in the ServerApp's process",
        "",
    ),
    "a baseline under virtual time": (
        {**VIRTUAL, "strategy.name": "local"},
        "baselines train in the ServerApp's process in real time",
        "",
    ),
    "strategy.staleness = 'exp'": (
        {**FEDBUFF, "strategy.staleness": "exp"},
        "unknown staleness function 'exp'",
        "",
    ),
    "strategy.staleness-a = -1": (
        {**FEDBUFF, "strategy.staleness-a": -1.0},
        "staleness parameters must be >= 0",
        "",
    ),
    "strategy.server-optimizer = 'lion'": (
        {**FEDBUFF, "strategy.server-optimizer": "lion"},
        "unknown server optimizer 'lion'",
        "",
    ),
    "strategy.server-lr = 0": ({**FEDBUFF, "strategy.server-lr": 0.0}, "server learning rate 0.0 must be > 0", ""),
    "strategy.server-beta1 = 1.5 (adam)": (
        {**FEDBUFF, "strategy.server-optimizer": "adam", "strategy.server-beta1": 1.5},
        "strategy.server-beta1",
        "",
    ),
    "strategy.buffer-size = 0": ({**FEDBUFF, "strategy.buffer-size": 0}, "buffer size K = 0 must be >= 1", ""),
    "strategy.fedasync-alpha = 1.5": (
        {"strategy.name": "fedasync", "strategy.fedasync-alpha": 1.5},
        "FedAsync alpha = 1.5 must be in (0, 1]",
        "",
    ),
    "strategy.num-versions = 0": ({"strategy.num-versions": 0}, "strategy.num-versions = 0 must be >= 1", ""),
    "strategy.concurrency = -1": ({"strategy.concurrency": -1}, "strategy.concurrency = -1 must be >= 0", ""),
    "strategy.message-ttl = 0": ({"strategy.message-ttl": 0.0}, "strategy.message-ttl = 0.0 must be > 0", ""),
    "strategy.num-rounds = 0 (fedavg)": ({"strategy.num-rounds": 0}, "strategy.num-rounds", ""),
    "strategy.fraction-train = 0": ({"strategy.fraction-train": 0.0}, "strategy.fraction-train", ""),
    "strategy.fraction-train = 1.5": ({"strategy.fraction-train": 1.5}, "strategy.fraction-train", ""),
    "strategy.min-nodes = 0": ({"strategy.min-nodes": 0}, "strategy.min-nodes", ""),
    "strategy.round-timeout = 0": ({"strategy.round-timeout": 0.0}, "strategy.round-timeout", ""),
    "strategy.max-seconds = -1": ({"strategy.max-seconds": -1.0}, "strategy.max-seconds", ""),
    "strategy.max-update-norm = -1": ({"strategy.max-update-norm": -1.0}, "strategy.max-update-norm", ""),
    "strategy.min-local-steps = 0 (walltime-aware)": (
        {**WALLTIME_AWARE, "strategy.min-local-steps": 0},
        "need 1 <= min-local-steps (0)",
        "",
    ),
    "strategy.estimate-momentum = 1.5 (walltime-aware)": (
        {**WALLTIME_AWARE, "strategy.estimate-momentum": 1.5},
        "estimate-momentum (1.5) in [0, 1)",
        "",
    ),
    "eval.every = -1": ({"eval.every": -1}, "eval.every = -1 must be >= 0", ""),
    "eval.at = 'summit' (no such facility)": ({"eval.at": "summit"}, "eval.at = 'summit'", ""),
    "eval.at = a facility under virtual time": (
        {**VIRTUAL, "eval.at": "polaris"},
        "eval.at = <facility> is for real-time runs",
        "",
    ),
    "eval.batch-size = 0": ({"eval.batch-size": 0}, "eval.batch-size", ""),
    "eval.max-new-tokens = 0": ({"eval.max-new-tokens": 0}, "eval.max-new-tokens", ""),
    "eval.loss-per-task = -1": ({"eval.loss-per-task": -1}, "eval.loss-per-task", ""),
    "emulation.slowdown = 'polaris' (no number)": (
        {"emulation.slowdown": "polaris"},
        "emulation.slowdown entry 'polaris' must be 'facility=number'",
        "",
    ),
    "emulation.slowdown = 'polaris=0.5' (below 1)": (
        {"emulation.slowdown": "polaris=0.5"},
        "with number >= 1",
        "",
    ),
    "emulation.seconds-per-step = 'polaris=fast'": (
        {**VIRTUAL, "emulation.seconds-per-step": "polaris=fast"},
        "emulation.seconds-per-step entry 'polaris=fast' must be 'facility=number'",
        "",
    ),
    "emulation.walltime missing facilities": (
        {**VIRTUAL, "emulation.walltime": "polaris=3600"},
        "emulation.walltime must list every facility of data.facilities",
        "",
    ),
    "emulation.queue-median = -1": (
        {**VIRTUAL, "emulation.queue-median": each(-1)},
        "emulation.queue-median entry 'polaris=-1' must be 'facility=number' with number >= 0",
        "",
    ),
    "emulation.spike-probability = 2": (
        {**VIRTUAL, "emulation.spike-probability": 2.0},
        "emulation.spike-probability in [0, 1]",
        "",
    ),
    "emulation.transfer-mb-per-second = 0": (
        {**VIRTUAL, "emulation.transfer-mb-per-second": 0.0},
        "emulation.transfer-mb-per-second > 0",
        "",
    ),
    "emulation.seed = -1": (
        {**VIRTUAL, "emulation.seed": -1},
        "emulation.seed",
        "",
    ),
    "emulation.queue-trace names no file": (
        {**VIRTUAL, "emulation.queue-trace": "/nonexistent/launch.jsonl"},
        "emulation.queue-trace = '/nonexistent/launch.jsonl' does not exist",
        "",
    ),
    "resume under virtual time": (
        {**VIRTUAL, "resume": "outputs/run"},
        "resume",
        "",
    ),
    "run-name = '' (outputs.dir itself)": (
        {"run-name": ""},
        "run-name",
        "",
    ),
    "run-name = 'a/b'": ({"run-name": "a/b"}, "run-name", ""),
}


def domain_case(bad: str, overrides: dict[str, Scalar], expect: str, gap: str) -> Case:
    def setup(workdir: Path) -> Call:
        from chemfl.checks import check_run_config

        return lambda: check_run_config(resolve(overrides))

    return Case("recipe value out of its domain", bad, "check_run_config(resolve(...))", setup, expect, gap)


DOMAIN_CASES = [domain_case(bad, *spec) for bad, spec in DOMAIN.items()]


# --- 3. files that are not there ----------------------------------------------------------------


def missing_file_cases() -> list[Case]:
    def run_outputs(workdir: Path) -> Call:
        from chemfl.server_app.outputs import RunOutputs

        return lambda: RunOutputs(workdir / "outputs", "run", resume=workdir / "outputs" / "gone")

    def checkpointer(workdir: Path) -> Call:
        from chemfl.server_app.checkpoint import Checkpointer
        from tests.server_app.rule_defaults import fedbuff

        (workdir / "outputs" / "run").mkdir(parents=True)
        return lambda: Checkpointer(workdir / "outputs" / "run" / "checkpoint").load(fedbuff())

    section, sim = "file not there", "chemfl simulate RECIPE"
    return [
        Case(section, "recipe file", sim, lambda w: cli("simulate", w / "missing.toml"), "missing.toml does not exist"),
        Case(
            section,
            "--run-config file",
            "chemfl data build",
            lambda w: cli("data", "build", "--run-config", w / "missing.toml", "--out", w / "out"),
            "run config <tmp>/missing.toml does not exist",
        ),
        Case(
            section,
            "Flower App folder (--app)",
            sim,
            lambda w: cli("simulate", recipe(w, ""), "--app", w / "no-app"),
            "is not a Flower App folder (no pyproject.toml)",
        ),
        Case(
            section,
            "data.files names no file",
            "chemfl data build",
            lambda w: cli("data", "build", "--source", "files", "--files", w / "nowhere.jsonl", "--out", w / "out"),
            "data file <tmp>/nowhere.jsonl does not exist",
        ),
        Case(
            section,
            "data.source = files without data.files",
            "chemfl data build",
            lambda w: cli("data", "build", "--source", "files", "--out", w / "out"),
            'needs data.files = "a.jsonl,b.parquet,..."',
        ),
        Case(
            section,
            "data.smolinstruct-path names no file",
            "chemfl data build",
            lambda w: cli(
                "data", "build", "--source", "smolinstruct", "--smolinstruct-path", w / "data.zip", "--out", w / "out"
            ),
            "data.smolinstruct-path <tmp>/data.zip does not exist",
        ),
        Case(
            section,
            "model.name names a folder that is not there",
            sim,
            lambda w: cli("simulate", recipe(w, f'model.name = "{w / "no-model"}"\n'), "--app", REPO),
            "looks like a local path but does not exist",
        ),
        Case(
            section,
            "model.name names a package that is not installed",
            sim,
            lambda w: cli("simulate", recipe(w, 'model.name = "pkg:no_such_model"\n'), "--app", REPO),
            "the Python package 'no_such_model' is not installed",
        ),
        Case(
            section,
            "model.gguf-file not in the model folder",
            sim,
            lambda w: cli("simulate", recipe(w, 'model.gguf-file = "missing.gguf"\n'), "--app", REPO),
            "model.gguf-file 'missing.gguf' is not in",
        ),
        Case(
            section,
            "facilities file",
            "chemfl launch submit FILE --dry-run",
            lambda w: cli("launch", "submit", w / "missing.toml", "--dry-run", "--out", w / "launch"),
            "no such facilities file",
        ),
        Case(
            section,
            "build folder to verify",
            "chemfl data verify",
            lambda w: cli("data", "verify", w / "nowhere"),
            "has neither manifest.json (a build) nor shard.json (a facility shard)",
        ),
        Case(
            section,
            "build folder without test.parquet",
            "chemfl data baselines",
            lambda w: cli("data", "baselines", w),
            "has no test.parquet; point at a build folder",
        ),
        Case(section, "resume names no run folder", "RunOutputs (resume)", run_outputs, "no such run folder"),
        Case(
            section,
            "resume a run folder without a checkpoint",
            "Checkpointer.load (resume)",
            checkpointer,
            "nothing to resume: <tmp>/outputs/run/checkpoint/state.json does not exist",
        ),
    ]


# --- 4. data files that are damaged or malformed ------------------------------------------------

ROW = {
    "input_core_tag_left": "<SMILES>",
    "input_core_tag_right": "</SMILES>",
    "output_core_tag_left": "<MOLFORMULA>",
    "output_core_tag_right": "</MOLFORMULA>",
}


def rows(n: int, splits: tuple[str, ...] = ()) -> list[dict]:
    """n records about n different molecules (carbon chains); split cycles through `splits`."""
    out = []
    for k in range(1, n + 1):
        row = {
            "input": f"Formula of <SMILES> {'C' * k} </SMILES> ?",
            "output": f"<MOLFORMULA> C{k}H{2 * k + 2} </MOLFORMULA>",
            "raw_input": "C" * k,
            "raw_output": f"C{k}H{2 * k + 2}",
            "task": "s2f",
            **ROW,
        }
        if splits:
            row["split"] = splits[k % len(splits)]
        out.append(row)
    return out


def jsonl(items: list) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def data_file_case(bad: str, name: str, content: Callable[[], str | bytes], expect: str) -> Case:
    def setup(workdir: Path) -> Call:
        path = workdir / name
        data = content()
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return cli(
            "data", "build", "--source", "files", "--files", path, "--facilities", "a,b", "--out", workdir / "out"
        )

    return Case("data file damaged or malformed", bad, "chemfl data build --source files", setup, expect)


def smolinstruct_case(bad: str, damage: Callable[[Path], None], expect: str) -> Case:
    def setup(workdir: Path) -> Call:
        from tests.conftest import write_smolinstruct_tree

        tree = write_smolinstruct_tree(workdir / "SMolInstruct")
        damage(tree)
        return cli(
            "data",
            "build",
            "--source",
            "smolinstruct",
            "--smolinstruct-path",
            tree,
            "--tasks",
            "name_conversion-s2f",
            "--facilities",
            "a,b",
            "--out",
            workdir / "out",
        )

    return Case("data file damaged or malformed", bad, "chemfl data build --source smolinstruct", setup, expect)


def truncated_jsonl() -> str:
    text = jsonl(rows(20))
    return text[: len(text) // 2]


DATA_FILE_CASES = [
    data_file_case("a .jsonl cut off mid-record", "data.jsonl", truncated_jsonl, ": not a JSON record ("),
    data_file_case(
        "a .json cut off",
        "data.json",
        lambda: json.dumps(rows(20))[:-40],
        "data file <tmp>/data.json is not valid JSON",
    ),
    data_file_case(
        "a .json that is not a list",
        "data.json",
        lambda: json.dumps({"records": rows(3)}),
        "a .json data file must hold a list of records",
    ),
    data_file_case(
        "a .jsonl of numbers, not records",
        "data.jsonl",
        lambda: "1\n2\n",
        "record 1 is int 1, not an object with the fields",
    ),
    data_file_case(
        "a .jsonl that is not UTF-8",
        "data.jsonl",
        lambda: b"\xff\xfe" + jsonl(rows(3)).encode("utf-16-le"),
        "data file <tmp>/data.jsonl is not UTF-8 text",
    ),
    data_file_case(
        "a .parquet that is not parquet",
        "data.parquet",
        lambda: b"PAR1 not really",
        "data file <tmp>/data.parquet is not a readable parquet file",
    ),
    data_file_case("a .csv", "data.csv", lambda: "input,output\n", "use one of .jsonl, .json, .parquet"),
    data_file_case("an empty file", "data.jsonl", lambda: "", "holds no records"),
    data_file_case(
        "records without raw_input and task",
        "data.jsonl",
        lambda: jsonl([{k: v for k, v in r.items() if k not in ("raw_input", "task")} for r in rows(5)]),
        "lacks required column(s) ['raw_input', 'task']",
    ),
    data_file_case(
        "an unknown split name",
        "data.jsonl",
        lambda: jsonl(rows(6, ("train", "holdout"))),
        "unknown split 'holdout' in data files",
    ),
    data_file_case(
        "some records with a split, some without",
        "data.jsonl",
        lambda: jsonl(rows(6, ("train", "test")) + rows(2)),
        "6 of 8 records carry a split and the rest do not",
    ),
    data_file_case(
        "splits without any test record",
        "data.jsonl",
        lambda: jsonl(rows(10, ("train", "validation"))),
        "the data carry splits but no test records",
    ),
    data_file_case(
        "train and test only, all in one molecule group",
        "data.jsonl",
        lambda: jsonl([{**r, "split": "train"} for r in rows(1) * 3] + rows(5, ("test",))[1:]),
        "no validation records, and the 3 train record(s) form 1 molecule group(s)",
    ),
    smolinstruct_case(
        "a SMolInstruct template file cut off",
        lambda tree: (tree / "template" / "instruction_tuning" / "name_conversion-s2f.json").write_text('[{"in'),
        "SMolInstruct data file <tmp>/SMolInstruct/template/instruction_tuning/name_conversion-s2f.json is damaged",
    ),
    smolinstruct_case(
        "a SMolInstruct raw line cut off",
        lambda tree: (tree / "raw" / "train" / "name_conversion-s2f.jsonl").write_text('{"input": "CCO", "out\n' * 6),
        "SMolInstruct data file <tmp>/SMolInstruct/raw/train/name_conversion-s2f.jsonl, line 1, is damaged",
    ),
    smolinstruct_case(
        "a SMolInstruct train file missing",
        lambda tree: (tree / "raw" / "train" / "name_conversion-s2f.jsonl").unlink(),
        "SMolInstruct data is missing <tmp>/SMolInstruct/raw/train/name_conversion-s2f.jsonl",
    ),
    Case(
        "data file damaged or malformed",
        "data.smolinstruct-path is neither a folder nor a zip",
        "chemfl data build --source smolinstruct",
        lambda w: (
            (w / "data.zip").write_text("not a zip"),
            cli("data", "build", "--source", "smolinstruct", "--smolinstruct-path", w / "data.zip", "--out", w / "o"),
        )[1],
        "is neither a folder nor a zip file",
    ),
]


# --- 5. builds and shards that are damaged --------------------------------------------------------

_BUILD_CACHE: dict[str, Path] = {}


def tiny_build(workdir: Path) -> Path:
    """A files-source build (40 records, facilities a and b) copied to workdir/build."""
    if "build" not in _BUILD_CACHE or not _BUILD_CACHE["build"].is_dir():
        import atexit
        import tempfile

        from chemfl.data_prep.build import BuildSpec, build_dataset

        cache = Path(tempfile.mkdtemp(prefix="chemfl-bad-inputs-"))
        atexit.register(shutil.rmtree, cache, True)
        (cache / "data.jsonl").write_text(jsonl(rows(40)))
        overrides = {"data.source": "files", "data.files": str(cache / "data.jsonl"), "data.facilities": "a,b"}
        build_dataset(BuildSpec.from_config(resolve(overrides)), cache / "build")
        _BUILD_CACHE["build"] = cache / "build"
    shutil.copytree(_BUILD_CACHE["build"], workdir / "build")
    return workdir / "build"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def shard_case(bad: str, damage: Callable[[Path], None], expect: str) -> Case:
    def setup(workdir: Path) -> Call:
        from chemfl.data_prep.shards import load_shard

        shard = tiny_build(workdir) / "partitions" / "a"
        damage(shard)
        return lambda: load_shard(shard)

    return Case("build or shard damaged", bad, "chemfl.data_prep.shards.load_shard (ClientApp)", setup, expect)


def rebuild(workdir: Path, *extra: str) -> Call:
    """`chemfl data build` of the tiny build's own spec (its data file is where it was built) into workdir/build."""
    return cli(
        "data",
        "build",
        "--source",
        "files",
        "--files",
        _BUILD_CACHE["build"].parent / "data.jsonl",
        "--facilities",
        "a,b",
        "--out",
        workdir / "build",
        *extra,
    )


def build_case(bad: str, damage: Callable[[Path], None], call: Callable[[Path], Call], entry: str, expect: str) -> Case:
    def setup(workdir: Path) -> Call:
        damage(tiny_build(workdir))
        return call(workdir)

    return Case("build or shard damaged", bad, entry, setup, expect)


def shard_dir(workdir: Path) -> Call:
    from chemfl.data_prep.shards import shard_dir_for

    return lambda: shard_dir_for(str(workdir / "build"), {"partition-id": 0, "num-partitions": 2})


def not_a_build(workdir: Path) -> Call:
    (workdir / "build").mkdir()
    (workdir / "build" / "notes.txt").write_text("precious")
    (workdir / "data.jsonl").write_text(jsonl(rows(40)))
    return cli("data", "build", "--source", "files", "--files", workdir / "data.jsonl", "--out", workdir / "build")


BUILD_CASES = [
    shard_case(
        "a flipped byte in a shard's train.parquet",
        lambda shard: flip_byte(shard / "train.parquet"),
        "does not match its manifest (train.parquet: sha256 differs from the manifest)",
    ),
    shard_case(
        "a shard's validation.parquet missing",
        lambda shard: (shard / "validation.parquet").unlink(),
        "does not match its manifest (validation.parquet: missing)",
    ),
    shard_case(
        "a shard's shard.json cut off",
        lambda shard: truncate(shard / "shard.json"),
        "does not match its manifest (shard.json: damaged (not readable JSON",
    ),
    shard_case(
        "a shard's shard.json without its facility",
        lambda shard: (shard / "shard.json").write_text(
            json.dumps({k: v for k, v in json.loads((shard / "shard.json").read_text()).items() if k != "facility"})
        ),
        "shard.json is damaged (no valid facility); copy the shard again from the build",
    ),
    shard_case(
        "data-path pointing at a build, not a shard",
        lambda shard: (shard / "shard.json").unlink(),
        "is not a ChemFL shard (no shard.json)",
    ),
    build_case(
        "a flipped byte in test.parquet",
        lambda build: flip_byte(build / "test.parquet"),
        lambda w: cli("data", "verify", w / "build"),
        "chemfl data verify",
        "does not match its manifest: test.parquet: sha256 differs from the manifest",
    ),
    build_case(
        "the same build again, its manifest.json cut off",
        lambda build: truncate(build / "manifest.json"),
        rebuild,
        "chemfl data build",
        "<tmp>/build/manifest.json is damaged (not readable JSON",
    ),
    build_case(
        "the same build again, a shard file changed",
        lambda build: flip_byte(build / "partitions" / "b" / "train.parquet"),
        rebuild,
        "chemfl data build",
        "holds this build but its files do not match its manifest",
    ),
    build_case(
        "another build into the folder, without --force",
        lambda build: None,
        lambda w: rebuild(w, "--seed", "7"),
        "chemfl data build",
        "already holds a different build",
    ),
    Case(
        "build or shard damaged",
        "a build into a folder that is not a build",
        "chemfl data build",
        not_a_build,
        "exists and is not a ChemFL data build (no manifest.json)",
    ),
    build_case(
        "the build's manifest.json cut off",
        lambda build: truncate(build / "manifest.json"),
        shard_dir,
        "chemfl.data_prep.shards.shard_dir_for (simulation ClientApp)",
        "<tmp>/build/manifest.json is damaged (not readable JSON",
    ),
]


# --- 6. checkpoints that are damaged ------------------------------------------------------------


def checkpoint_case(bad: str, damage: Callable[[Path], None], expect: str) -> Case:
    def setup(workdir: Path) -> Call:
        from chemfl.server_app.aggregation import ServerOptimizer
        from chemfl.server_app.checkpoint import AsyncState, Checkpointer
        from tests.server_app.rule_defaults import fedbuff

        def rule():
            return fedbuff(buffer_size=3, optimizer=ServerOptimizer("adam", 0.1, 0.9, 0.99))

        folder = workdir / "outputs" / "run" / "checkpoint"
        arrays = {"m.lora_A.weight": np.ones((2, 3), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}
        saved = rule()
        saved.buffer = [(arrays, 0.5)]
        saved.optimizer_state.step = 1
        saved.optimizer_state.first_moment = saved.optimizer_state.second_moment = arrays
        Checkpointer(folder).save(AsyncState(params=arrays, version=2), saved)
        damage(folder)
        return lambda: Checkpointer(folder).load(rule())

    return Case("checkpoint damaged", bad, "Checkpointer.load (resume = outputs/<run>)", setup, expect)


CHECKPOINT_CASES = [
    checkpoint_case(
        "state.json cut off",
        lambda f: truncate(f / "state.json"),
        "<tmp>/outputs/run/checkpoint/state.json is damaged (not readable JSON",
    ),
    checkpoint_case(
        "state.json not JSON",
        lambda f: (f / "state.json").write_text("version = 2\n"),
        "<tmp>/outputs/run/checkpoint/state.json is damaged (not readable JSON",
    ),
    checkpoint_case(
        "state.json without its version",
        lambda f: (f / "state.json").write_text(
            json.dumps({k: v for k, v in json.loads((f / "state.json").read_text()).items() if k != "version"})
        ),
        "state.json is damaged (no 'version')",
    ),
    checkpoint_case(
        "the global adapter file missing",
        lambda f: (f / "global-v2.npz").unlink(),
        "state.json names global-v2.npz, which is missing from <tmp>/outputs/run/checkpoint",
    ),
    checkpoint_case(
        "a buffered update's file missing",
        lambda f: (f / "buffer-1.npz").unlink(),
        "state.json names buffer-1.npz, which is missing",
    ),
    checkpoint_case(
        "a flipped byte in the global adapter",
        lambda f: flip_byte(f / "global-v2.npz"),
        "<tmp>/outputs/run/checkpoint/global-v2.npz is damaged (not a readable .npz file",
    ),
    checkpoint_case(
        "the optimizer moments cut off",
        lambda f: truncate(f / "optimizer-v2-s1.npz"),
        "optimizer-v2-s1.npz is damaged (not a readable .npz file",
    ),
    checkpoint_case(
        "a buffered update of another adapter",
        lambda f: np.savez(f / "buffer-1.npz", x=np.zeros(3)),
        "buffer-1.npz is damaged (its arrays differ from those state.json lists)",
    ),
]


# --- 7. facilities files with errors --------------------------------------------------------------


def facilities_case(bad: str, change: dict | Callable[[Path], str], expect: str) -> Case:
    def setup(workdir: Path) -> Call:
        import tomli_w

        (workdir / "recipe.toml").write_text('run-name = "x"\n')
        path = workdir / "facilities.toml"
        if callable(change):
            path.write_text(change(workdir))
        else:
            table = {
                "profile": "polaris",
                "account": "proj",
                "walltime": "00:30:00",
                "layout": "per-gpu",
                "supernodes-per-node": 2,
                "data-path": "/eagle/proj/partitions/polaris",
                **change,
            }
            plan = {
                "superlink": {"address": "fl.example.org:443", "root-certificates": "", "keys-dir": ""},
                "facilities": {"polaris": {k: v for k, v in table.items() if v is not None}},
            }
            path.write_text(tomli_w.dumps(plan))
        return cli("launch", "submit", path, "--dry-run", "--out", workdir / "launch")

    return Case("facilities file with errors", bad, "chemfl launch submit FILE --dry-run", setup, expect)


FACILITIES_CASES = [
    facilities_case("unknown profile", {"profile": "summit"}, 'profile "summit" is unknown'),
    facilities_case("no account", {"account": None}, "facility polaris: no account"),
    facilities_case("walltime over the queue's cap", {"walltime": "99:00:00"}, "walltime 99:00:00 is over queue"),
    facilities_case("walltime not HH:MM:SS", {"walltime": "1h"}, 'walltime "1h" is malformed'),
    facilities_case("unknown layout", {"layout": "per-node"}, 'layout "per-node" is unknown'),
    facilities_case("nodes = 0", {"nodes": 0}, "nodes = 0; a job needs at least one node"),
    facilities_case("a misspelt key", {"wall-time": "01:00:00"}, 'unknown key "wall-time"; did you mean "walltime"?'),
    facilities_case("not TOML", lambda w: "[superlink\naddress = 1\n", "not valid TOML"),
    facilities_case("no [superlink] table", lambda w: '[facilities.a]\nprofile = "local"\n', "no [superlink] table"),
    facilities_case(
        "no facilities",
        lambda w: '[superlink]\naddress = "fl.example.org:443"\n',
        "no facilities; add a [facilities.<name>] table per facility",
    ),
]


CASES = TYPE_CASES + DOMAIN_CASES + missing_file_cases() + DATA_FILE_CASES + BUILD_CASES
CASES += CHECKPOINT_CASES + FACILITIES_CASES


def normalized(message: str, workdir: Path) -> str:
    """The message with the case's folder as <tmp> and this checkout as <repo>."""
    text = message.replace(str(workdir), "<tmp>").replace(str(REPO), "<repo>")
    text = re.sub(r"/\S*/chemfl-bad-inputs-[^/\s]+", "<tmp>", text)
    return re.sub(r"\b[0-9a-f]{16}\b", "<build id>", text)  # build ids hash the data files' paths


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[pytest.mark.xfail(strict=True, reason=c.gap)] if c.gap else []) for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input_is_a_clear_error_before_any_work(case, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    outcome = attempt(case, workdir)
    message = normalized(outcome.message, workdir)
    assert outcome.clear, f"{case.entry}: {case.bad} -> {outcome.kind}: {message}"
    assert case.expect in message, message
    assert outcome.untouched, f"{case.entry}: {case.bad} changed {workdir}"


def test_the_cases_have_distinct_names_and_cover_every_recipe_key():
    assert len({c.id for c in CASES}) == len(CASES)
    typed = {c.bad.split(" = ")[0] for c in CASES if c.entry == "chemfl.config.resolve" and " = " in c.bad}
    assert typed == set(DEFAULTS)
