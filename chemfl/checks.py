"""Every knob of a run checked before any work starts: by the ServerApp when a run begins, and by
`chemfl simulate` before it starts Flower, so a bad recipe is one clear error line in seconds, not
a traceback in Flower's log after the SuperLink and Ray have started."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chemfl.config import Scalar, resolve, split_list
from chemfl.data_prep.build import BuildSpec
from chemfl.emulation import parse_slowdown
from chemfl.emulation.campaign import CampaignSpec
from chemfl.errors import ChemFLError
from chemfl.llm.evaluation import EvalSpec
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.llm.training import TrainSpec
from chemfl.server_app.strategy_spec import StrategySpec

SERVER = "server"


@dataclass(frozen=True)
class RunSpecs:
    build: BuildSpec
    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    eval: EvalSpec
    strategy: StrategySpec
    campaign: CampaignSpec | None  # emulation.virtual-time only
    evaluation_site: str  # "server" or a facility (eval.at)


def check_run_config(config: dict[str, Scalar]) -> RunSpecs:
    """Every spec of a resolved run config; the first bad value is a ChemFLError naming the knob."""
    check_run_name(str(config["run-name"]))
    strategy = StrategySpec.from_config(config)
    if str(config["resume"]) and (not strategy.asynchronous or strategy.virtual_time):
        raise ChemFLError(
            "resume is for asynchronous runs in real time (strategy.name = fedbuff, fedasync, walltime-aware, "
            "fedcompass or fedqueue, emulation.virtual-time = false); rerun an emulated campaign instead"
        )
    parse_slowdown(str(config["emulation.slowdown"]))
    facilities = tuple(split_list(str(config["data.facilities"])))
    return RunSpecs(
        build=BuildSpec.from_config(config),
        model=ModelSpec.from_config(config),
        lora=LoraSpec.from_config(config),
        train=TrainSpec.from_config(config),
        eval=EvalSpec.from_config(config),
        strategy=strategy,
        campaign=CampaignSpec.from_config(config, facilities) if strategy.virtual_time else None,
        evaluation_site=check_evaluation_site(config, strategy),
    )


def check_run_name(name: str) -> None:
    """The run's folder under outputs.dir: one plain folder name (an empty one would be outputs.dir
    itself, which a new run would move aside whole)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ChemFLError(
            f"run-name = {name!r} must be a plain folder name (no '/', not empty, not starting with '.'), "
            'e.g. run-name = "laptop"'
        )


def check_evaluation_site(config: dict[str, Scalar], strategy: StrategySpec) -> str:
    """`eval.at`: "server", or a facility of `data.facilities` (not under virtual time, whose
    emulated grid times training tasks only)."""
    site = str(config["eval.at"])
    facilities = split_list(str(config["data.facilities"]))
    if site != SERVER and site not in facilities:
        raise ChemFLError(f'eval.at = {site!r}; use "server" or one of data.facilities ({", ".join(facilities)})')
    if site != SERVER and strategy.virtual_time:
        raise ChemFLError('eval.at = <facility> is for real-time runs; emulated campaigns use eval.at = "server"')
    if site != SERVER and strategy.baseline:
        raise ChemFLError(
            f"eval.at = {site!r}: the {strategy.name} baseline trains and evaluates in the ServerApp's process "
            '(it loads the model to train anyway); set eval.at = "server"'
        )
    return site


def check_recipe(recipe: Path, overrides: dict[str, Scalar]) -> RunSpecs:
    """A recipe file (plus --set overrides) as `flwr run --run-config` would pass it, checked in
    full: the knobs, then that the model exists and has the LoRA target modules (from its config
    alone, no weights loaded; skipped for Hub ids, which need the network)."""
    from flwr.common.config import parse_config_args

    from chemfl.llm.adapter_init import adapter_skeleton
    from chemfl.llm.model import resolve_model_path

    try:
        values = parse_config_args([str(recipe)])
    except Exception as error:  # flwr raises bare exceptions for unreadable TOML
        raise ChemFLError(f"recipe {recipe} is not valid TOML ({error})") from None
    specs = check_run_config(resolve({**values, **overrides}))
    location, _ = resolve_model_path(specs.model)
    if Path(location).exists():
        adapter_skeleton(specs.model, specs.lora)
    return specs
