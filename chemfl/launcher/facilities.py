"""The facilities file: where SuperNodes run and how they reach the SuperLink.

A standalone TOML file (recipes/four-facilities/facilities.toml is a commented example). It is its
own file, not a section of a run recipe, because it holds per-user, per-site facts (accounts, paths
at each facility) that change independently of the experiment:

    [superlink]
    address = "fl.example.org:443"       # host:port every SuperNode connects out to (required)
    root-certificates = "~/chemfl/certs/ca.crt"  # CA certificate, path AT THE FACILITY; "" = system CAs
    insecure = false                      # plain gRPC: only towards localhost / 127.0.0.1 / ::1
    keys-dir = "~/chemfl/keys"            # SuperNode private keys AT THE FACILITY, one per SuperNode,
                                          # named <facility>-<index>; "" = no node authentication
    exposure = "fleet-only"               # `chemfl launch superlink`: fleet-only (default) puts nginx on the
                                          # public port, forwarding only the Fleet API to a SuperLink on
                                          # 127.0.0.1; direct = the SuperLink itself on the port (Control API
                                          # included: localhost studies only)

    [facilities.<name>]                   # name: letters, digits, '-' and '_'
    profile = "polaris"                   # polaris | aurora | frontier | perlmutter | pbs | slurm | local
    account = "MyProject"                 # required except for local
    queue = "debug"                       # PBS queue, Slurm partition or QOS (the profile knows which);
                                          # default: the profile's
    nodes = 1
    walltime = "01:00:00"                 # HH:MM:SS (hours may exceed 24), checked against the queue's cap
    layout = "per-job"                    # per-job: one SuperNode and one `chemfl trainer` (a rank per GPU
                                          # across all nodes) per job; per-gpu: one SuperNode per GPU
    recipe = "../laptop-fedbuff.toml"     # per-job: the run config the trainer loads at start (the one given to
                                          # flwr run --run-config); relative to this file's folder
    trainer-backend = "nccl"              # per-job: auto | nccl | gloo | xccl | ccl; default: the profile's
    trainer-env = { NCCL_DEBUG = "INFO" } # per-job: extra or replaced collective settings; "" drops one
    supernodes-per-node = 4               # per-gpu: default the profile's GPUs (tiles, GCDs) per node
    setup = ["module load conda", "source ~/chemfl/.venv/bin/activate"]  # replaces the profile's default
    proxy = "http://proxy.alcf.anl.gov:3128"  # default: the profile's; "" = none
    data-path = "/eagle/MyProject/chemfl/partitions/polaris"  # this facility's shard folder
    backend = "cli"                       # cli (qsub/sbatch on a login node) | globus
    globus-endpoint = ""                  # backend = globus: the Globus Compute endpoint id (a UUID)
    globus-config = {}                    # backend = globus: the endpoint's user_endpoint_config
    max-resubmits = 3                     # keep-alive: resubmissions after the job ends while the run lasts
    resubmit-backoff = 60                 # seconds before a resubmission, doubled after each
    queue-ahead = false                   # true: submit the next job when the current one starts, held by
                                          # the scheduler until it ends (PBS -W depend=afterany:<id>, Slurm
                                          # --dependency=afterany:<id>), so its queue wait overlaps the running
                                          # job; "early": a plain submission timed by the last queue wait, for
                                          # sites that refuse dependencies (two jobs may then run at once)
    directives = ["-l place=scatter"]     # extra scheduler lines, without the #PBS / #SBATCH prefix
    # generic profiles (pbs, slurm, local) only:
    gpus-per-node = 4
    gpu-pinning = "cuda"                  # cuda | ze | srun (slurm only) | none

Paths are used at the facility, inside double quotes: a leading `~` becomes $HOME there and
$VARIABLES (e.g. $PSCRATCH) expand there. Only a `local` facility's data path is checked here,
since only that one is on this machine; it is made absolute (relative paths are relative to the
current folder). `recipe` is read where `chemfl launch submit` runs (the facility's login node, with
this file beside it): a relative recipe path resolves against the facilities file's folder and must
exist; an absolute one (or ~, $VARIABLES) is taken as written and checked when it is on this machine.

Queue rules come from the profile (chemfl.launcher.profiles): walltime caps, node limits (Polaris
prod >= 10 nodes, Aurora debug-scaling >= 2, Frontier extended <= 64 ...), and queues that forbid
job chaining (Frontier debug: max-resubmits is 0 there, and a larger value is refused, as is
queue-ahead).

`load_facilities` checks everything before any script is rendered or submitted and raises
ChemFLError naming the facility, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chemfl.errors import ChemFLError
from chemfl.launcher.profiles import GPU_PINNINGS, LAYOUTS, PROFILES, TRAINER_BACKENDS, Profile, Setting

BACKENDS = ("cli", "globus")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

SUPERLINK_KEYS = {"address", "root-certificates", "insecure", "keys-dir", "exposure"}
EXPOSURES = ("fleet-only", "direct")  # [superlink] exposure: see chemfl.launcher.proxy
FACILITY_KEYS = {
    "profile",
    "account",
    "queue",
    "nodes",
    "walltime",
    "supernodes-per-node",
    "setup",
    "proxy",
    "data-path",
    "backend",
    "globus-endpoint",
    "globus-config",
    "max-resubmits",
    "resubmit-backoff",
    "queue-ahead",
    "directives",
    "layout",
    "recipe",
    "trainer-backend",
    "trainer-env",
}
GENERIC_PROFILE_KEYS = {"gpus-per-node", "gpu-pinning"}

# Characters that would break out of the double quotes (and, for data-path, the single quotes of
# --node-config) that paths are rendered in.
UNQUOTABLE = re.compile(r"""['"\\`]""")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # facility names become file, job and key names
WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # accounts and queues sit bare on directive lines
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SuperLinkTarget:
    """Where every SuperNode connects, and with which credentials (paths at the facility)."""

    address: str  # host:port
    root_certificates: str  # "" = the system's CA bundle
    insecure: bool
    keys_dir: str  # "" = no SuperNode authentication
    exposure: str = "fleet-only"  # what `chemfl launch superlink` puts on the port: "fleet-only" | "direct"


@dataclass(frozen=True)
class Facility:
    """One facility's batch job: the SuperNodes it starts and what the scheduler is asked for."""

    name: str
    profile: Profile  # with gpus_per_node / gpu_pinning from the file for generic profiles
    account: str
    queue: str  # "" = the scheduler's default
    nodes: int
    walltime_seconds: int
    supernodes_per_node: int
    setup: tuple[str, ...]
    proxy: str  # "" = none
    data_path: str
    backend: str  # "cli" | "globus"
    globus_endpoint: str
    globus_config: dict[str, Any]
    max_resubmits: int
    resubmit_backoff_seconds: float
    directives: tuple[str, ...]  # extra lines after the profile's
    layout: str = "per-job"  # "per-job" | "per-gpu"
    recipe: str = ""  # per-job: the run config `chemfl trainer --run-config` reads (a path where submit runs)
    trainer_backend: str = "auto"  # per-job: `chemfl trainer --backend`
    trainer_env: tuple[Setting, ...] = ()  # per-job: the profile's collective settings with the file's changes
    resubmit_note: str = ""  # why max-resubmits was forced to 0 (a queue that forbids job chaining)
    queue_ahead: str = ""  # "" | "dependency" (queue-ahead = true) | "early"


@dataclass(frozen=True)
class LaunchPlan:
    """A parsed, checked facilities file."""

    superlink: SuperLinkTarget
    facilities: tuple[Facility, ...]


def supernode_count(facility: Facility) -> int:
    """SuperNodes one job of this facility starts (indices 0 .. count - 1): one per job in the per-job
    layout (its trainer spans the job's GPUs), one per GPU (tile, GCD) in the per-gpu layout."""
    if facility.layout == "per-job":
        return 1
    return facility.nodes * facility.supernodes_per_node


def trainer_ranks_per_node(facility: Facility) -> int:
    """Per-job layout: `chemfl trainer` ranks on each node, one per GPU (tile, GCD)."""
    return facility.profile.gpus_per_node


def supernode_key_name(facility_name: str, index: int | str) -> str:
    """File name of a SuperNode's private key in keys-dir (`index` may be a shell expression for it).
    Keyed by position, not by job, so a resubmitted job's SuperNodes keep their node identities."""
    return f"{facility_name}-{index}"


def parse_walltime(text: str) -> int:
    """'HH:MM:SS' -> seconds; the one form both PBS and Slurm accept (hours may exceed 24)."""
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d)", text.strip())
    if match is None:
        raise ValueError(text)
    hours, minutes, seconds = (int(part) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_walltime(seconds: int) -> str:
    """seconds -> 'HH:MM:SS', the form the directives use."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def load_facilities(path: str | Path) -> LaunchPlan:
    """Read and check a facilities file (schema in this module's docstring)."""
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ChemFLError(
            f"{path}: no such facilities file; copy recipes/four-facilities/facilities.toml and edit it"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ChemFLError(f"{path}: not valid TOML ({err}); fix the syntax there") from None
    try:
        return parse_plan(raw, base_dir=path.parent)
    except ChemFLError as err:
        raise ChemFLError(f"{path}: {err}") from None


def parse_plan(raw: dict[str, Any], base_dir: str | Path | None = None) -> LaunchPlan:
    """Check a facilities table already read from TOML (load_facilities without the file). Relative
    recipe paths resolve against `base_dir` (the facilities file's folder; default: the current one)."""
    _reject_unknown_keys(raw, {"superlink", "facilities"}, "the facilities file")
    if not isinstance(raw.get("superlink"), dict):
        raise ChemFLError('no [superlink] table; add one with address = "host:port" of your SuperLink')
    superlink = _superlink(raw["superlink"])
    tables = raw.get("facilities")
    if not isinstance(tables, dict) or not tables:
        raise ChemFLError("no facilities; add a [facilities.<name>] table per facility")
    facilities = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ChemFLError(f"facilities.{name} is not a table; write it as [facilities.{name}]")
        facilities.append(_facility(name, table, Path(base_dir) if base_dir is not None else Path.cwd()))
    return LaunchPlan(superlink=superlink, facilities=tuple(facilities))


def _superlink(table: dict[str, Any]) -> SuperLinkTarget:
    where = "[superlink]"
    _reject_unknown_keys(table, SUPERLINK_KEYS, where)
    address = _get(table, "address", str, None, where)
    host = _address_host(address, where)
    target = SuperLinkTarget(
        address=address,
        root_certificates=_path(table, "root-certificates", "", where),
        insecure=_get(table, "insecure", bool, False, where),
        keys_dir=_path(table, "keys-dir", "", where),
        exposure=_get(table, "exposure", str, "fleet-only", where),
    )
    if target.exposure not in EXPOSURES:
        raise ChemFLError(
            f'{where}: exposure "{target.exposure}" is unknown; use "fleet-only" (the default: a proxy on the '
            'public port forwards only the Fleet API to the SuperLink on 127.0.0.1) or "direct" (the SuperLink '
            "itself on the port, its Control API included: for localhost studies)"
        )
    if target.insecure:
        if host not in LOCAL_HOSTS:
            raise ChemFLError(
                f"{where}: insecure = true sends model updates unencrypted to {address}; "
                "plain gRPC is only allowed towards localhost or 127.0.0.1: set insecure = false "
                "and give root-certificates (or none, for a certificate from a public CA)"
            )
        if target.root_certificates:
            raise ChemFLError(
                f"{where}: insecure = true and root-certificates both set (flower-supernode "
                "refuses the pair); remove root-certificates or set insecure = false"
            )
        if target.keys_dir:
            raise ChemFLError(
                f"{where}: keys-dir is set but insecure = true, and SuperNode authentication "
                'needs TLS; set insecure = false, or keys-dir = "" for no node authentication'
            )
    return target


def _address_host(address: str, where: str) -> str:
    """The host of 'host:port' or '[v6]:port' (for the localhost check); rejects anything else."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", address)
    if match is None:
        raise ChemFLError(
            f'{where}: address "{address}" is not host:port; write it like "fl.example.org:443" (no https:// prefix)'
        )
    return match.group(1) or match.group(3)


def _facility(name: str, table: dict[str, Any], base_dir: Path) -> Facility:
    where = f"facility {name}"
    if not NAME.match(name):
        raise ChemFLError(f"{where}: the name becomes file, job and key names; use letters, digits, '-' and '_'")
    profile = _profile(table, where)
    _reject_unknown_keys(table, FACILITY_KEYS | (GENERIC_PROFILE_KEYS if profile.generic else set()), where)
    is_local = profile.scheduler == "local"
    layout = _get(table, "layout", str, "per-job", where)
    if layout not in LAYOUTS:
        raise ChemFLError(
            f'{where}: layout "{layout}" is unknown; use "per-job" (one SuperNode and one trainer per job, '
            'the default) or "per-gpu" (one SuperNode per GPU)'
        )
    account = _account(table, is_local, where)
    queue = _get(table, "queue", str, profile.default_queue, where)
    if queue and not WORD.match(queue):
        raise ChemFLError(f'{where}: queue "{queue}" is not a queue name; use letters, digits, ".", "-", "_"')
    nodes = _nodes(table, is_local, where)
    _check_queue_nodes(profile, queue, nodes, where)
    walltime_seconds = _walltime(table, profile, queue, where)
    supernodes_per_node = _supernodes_per_node(table, profile, layout, where)
    directives = _directives(table, is_local, where)
    setup = _setup(table, profile, where)
    proxy = _get(table, "proxy", str, profile.default_proxy, where)
    if proxy and not re.match(r"^https?://[^\s'\"\\`]+$", proxy):
        raise ChemFLError(
            f'{where}: proxy "{proxy}" is not a URL; write it like "http://proxy.example.org:3128", or "" for none'
        )
    data_path = _data_path(table, is_local, where)
    backend, globus_endpoint = _backend(table, is_local, where)
    max_resubmits, resubmit_note = _max_resubmits(table, profile, queue, where)
    backoff = _get(table, "resubmit-backoff", (int, float), 60, where)
    if max_resubmits < 0 or backoff < 0:
        raise ChemFLError(f"{where}: max-resubmits and resubmit-backoff cannot be negative; use 0 to disable")
    recipe, trainer_backend, trainer_env = _trainer(table, profile, layout, base_dir, where)
    queue_ahead = _queue_ahead(table, profile, queue, backend, max_resubmits, where)

    return Facility(
        name=name,
        profile=profile,
        account=account,
        queue=queue,
        nodes=nodes,
        walltime_seconds=walltime_seconds,
        supernodes_per_node=supernodes_per_node,
        setup=setup,
        proxy=proxy,
        data_path=data_path,
        backend=backend,
        globus_endpoint=globus_endpoint,
        globus_config=_get(table, "globus-config", dict, {}, where),
        max_resubmits=max_resubmits,
        resubmit_backoff_seconds=float(backoff),
        directives=directives,
        layout=layout,
        recipe=recipe,
        trainer_backend=trainer_backend,
        trainer_env=trainer_env,
        resubmit_note=resubmit_note,
        queue_ahead=queue_ahead,
    )


def _check_queue_nodes(profile: Profile, queue: str, nodes: int, where: str) -> None:
    """Queues with node limits (profile.queue_node_limits): a job outside them is refused, or worse,
    accepted and then dropped (Polaris prod routes nothing under 10 nodes: "qstat: Unknown Job Id")."""
    limits = profile.queue_node_limits.get(queue)
    if limits is None:
        return
    fewest, most = limits
    if fewest <= nodes and (most is None or nodes <= most):
        return
    span = f"{fewest} or more nodes" if most is None else f"{fewest}-{most} nodes"
    fits = [
        name
        for name, (low, high) in profile.queue_node_limits.items()
        if low <= nodes and (high is None or nodes <= high)
    ]
    others = f" or queue = one of {', '.join(fits)}" if fits else ""
    raise ChemFLError(
        f"{where}: queue {queue} on {profile.name} takes {span}, and nodes = {nodes}; set nodes within that{others}"
    )


def _max_resubmits(table: dict[str, Any], profile: Profile, queue: str, where: str) -> tuple[int, str]:
    """max-resubmits, and why it is 0 where the queue forbids job chaining (Frontier's debug QOS)."""
    why = profile.no_resubmit_queues.get(queue, "")
    if not why:
        return _get(table, "max-resubmits", int, 3, where), ""
    max_resubmits = _get(table, "max-resubmits", int, 0, where)
    if max_resubmits > 0:
        raise ChemFLError(
            f"{where}: max-resubmits = {max_resubmits}, but queue {queue}: {why}; set max-resubmits = 0 "
            f"(or leave it out), or use another queue to keep the facility alive"
        )
    return max_resubmits, f"queue {queue}: {why}; jobs that end are not resubmitted"


def _queue_ahead(
    table: dict[str, Any], profile: Profile, queue: str, backend: str, max_resubmits: int, where: str
) -> str:
    """queue-ahead: "" (false), "dependency" (true) or "early"; refused where it cannot work."""
    value = table.get("queue-ahead", False)
    if isinstance(value, bool):
        mode = "dependency" if value else ""
    elif value == "early":
        mode = "early"
    else:
        raise ChemFLError(
            f"{where}: queue-ahead = {value!r} should be true (the next job queued with a dependency on the "
            'running one), "early" (a plain early submission, where the site refuses dependencies) or false'
        )
    if not mode:
        return ""
    why = profile.no_resubmit_queues.get(queue, "")
    if why:
        raise ChemFLError(
            f"{where}: queue-ahead, but queue {queue}: {why}; remove queue-ahead, or use a queue that allows "
            f"job chaining ({', '.join(q for q in profile.queue_walltime_caps if q not in profile.no_resubmit_queues)})"
        )
    if profile.scheduler == "local":
        raise ChemFLError(
            f"{where}: profile local starts each job at once, with no queue to wait in; remove queue-ahead"
        )
    if backend == "globus":
        raise ChemFLError(
            f"{where}: queue-ahead needs the job ids of the batch jobs, and with backend = globus the endpoint "
            'submits them out of sight; remove queue-ahead or use backend = "cli"'
        )
    if max_resubmits == 0:
        raise ChemFLError(
            f"{where}: queue-ahead submits the facility's next job early, and max-resubmits = 0 allows none; "
            "raise max-resubmits or remove queue-ahead"
        )
    return mode


def _setup(table: dict[str, Any], profile: Profile, where: str) -> tuple[str, ...]:
    """The setup lines (the profile's unless given); modules the profile wants pinned must carry a version."""
    if profile.setup_required and "setup" not in table:
        raise ChemFLError(f"{where}: no setup lines; {profile.setup_required}")
    setup = _strings(table, "setup", profile.default_setup, where)
    for line in setup:
        words = line.split()
        if words[:2] not in (["module", "load"], ["ml", "load"]) and words[:1] != ["ml"]:
            continue
        for module in profile.pinned_modules:
            if module in words:
                raise ChemFLError(
                    f'{where}: setup line "{line}" loads {module} without a version; pin it, e.g. {module}/X.Y.Z '
                    f"(the version your torch was built for: hpc.md, {profile.name})"
                )
    return setup


def _trainer(
    table: dict[str, Any], profile: Profile, layout: str, base_dir: Path, where: str
) -> tuple[str, str, tuple[Setting, ...]]:
    """(recipe, trainer-backend, trainer-env) for the per-job layout; nothing for per-gpu."""
    if layout != "per-job":
        for key in ("recipe", "trainer-backend", "trainer-env"):
            if key in table:
                raise ChemFLError(
                    f'{where}: {key} is for layout = "per-job" (the trainer), and this facility is '
                    f'layout = "{layout}"; remove {key} or set layout = "per-job"'
                )
        return "", profile.trainer_backend, ()
    recipe = _recipe(table, base_dir, where)
    backend = _get(table, "trainer-backend", str, profile.trainer_backend, where)
    if backend not in TRAINER_BACKENDS:
        raise ChemFLError(
            f'{where}: trainer-backend "{backend}" is unknown; use one of {", ".join(TRAINER_BACKENDS)} '
            f'(default for {profile.name}: "{profile.trainer_backend}")'
        )
    changes = _get(table, "trainer-env", dict, {}, where)
    settings = {setting.name: setting for setting in profile.trainer_env}
    for name, value in changes.items():
        if not ENV_NAME.match(name) or not isinstance(value, str):
            raise ChemFLError(
                f'{where}: trainer-env should map variable names to strings, e.g. {{ NCCL_DEBUG = "INFO" }}; '
                f"got {name} = {value!r}"
            )
        if UNQUOTABLE.search(value):
            raise ChemFLError(
                f"{where}: trainer-env {name} = {value!r} contains a quote, backslash or backtick, which the "
                "rendered script cannot quote; set it in the setup lines instead"
            )
        if value:
            settings[name] = Setting(name, value, "trainer-env in the facilities file")
        else:
            settings.pop(name, None)  # "" drops one of the profile's settings
    return recipe, backend, tuple(settings.values())


def _recipe(table: dict[str, Any], base_dir: Path, where: str) -> str:
    """The trainer's run config: required for per-job; relative paths resolve against the facilities file."""
    if "recipe" not in table:
        raise ChemFLError(
            f'{where}: layout = "per-job" (the default) starts `chemfl trainer`, which loads the run config at '
            'start; add recipe = "path/to/recipe.toml" (the --run-config you give flwr run; relative to the '
            'facilities file), or set layout = "per-gpu"'
        )
    recipe = _path(table, "recipe", None, where)
    expanded = os.path.expandvars(os.path.expanduser(recipe))
    at_facility_only = recipe.startswith(("~", "$")) or Path(recipe).is_absolute()
    path = Path(expanded) if Path(expanded).is_absolute() else (base_dir / expanded)
    if not path.is_file():
        if at_facility_only:
            return recipe  # a path at the facility, not on this machine (like data-path)
        raise ChemFLError(
            f'{where}: recipe "{recipe}" is not a file (looked for {path}; relative recipe paths resolve '
            "against the facilities file's folder); give the run config you pass to flwr run --run-config"
        )
    try:
        tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ChemFLError(f'{where}: recipe "{recipe}" ({path}) is not valid TOML ({err}); fix it there') from None
    if at_facility_only:
        return recipe
    return _quotable(str(path.resolve()), "recipe", where)


def _account(table: dict[str, Any], is_local: bool, where: str) -> str:
    """The allocation jobs are charged to: every scheduler needs one, and it sits bare on a directive line."""
    account = _get(table, "account", str, "", where)
    if not account and not is_local:
        raise ChemFLError(f'{where}: no account; add account = "<your project>" (the allocation jobs are charged to)')
    if account and not WORD.match(account):
        raise ChemFLError(
            f'{where}: account "{account}" has characters a directive cannot carry; '
            "use the project name exactly as the scheduler knows it"
        )
    return account


def _nodes(table: dict[str, Any], is_local: bool, where: str) -> int:
    nodes = _get(table, "nodes", int, 1, where)
    if nodes < 1:
        raise ChemFLError(f"{where}: nodes = {nodes}; a job needs at least one node, set nodes = 1 or more")
    if is_local and nodes > 1:
        raise ChemFLError(
            f"{where}: profile local runs on this one machine, so nodes = {nodes} is impossible; "
            "set nodes = 1 (and raise supernodes-per-node for more SuperNodes)"
        )
    return nodes


def _supernodes_per_node(table: dict[str, Any], profile: Profile, layout: str, where: str) -> int:
    """At most one SuperNode per GPU (tile, GCD): each is pinned to its own. The per-job layout has one
    SuperNode per job and a trainer rank on every GPU, so the key does not apply there."""
    if layout == "per-job" and "supernodes-per-node" in table:
        raise ChemFLError(
            f'{where}: supernodes-per-node is for layout = "per-gpu"; layout = "per-job" (the default) runs one '
            f"SuperNode per job and a trainer rank on each of the {profile.gpus_per_node} {profile.device}(s) of "
            'every node; remove supernodes-per-node, or set layout = "per-gpu"'
        )
    supernodes_per_node = _get(table, "supernodes-per-node", int, profile.gpus_per_node, where)
    if not 1 <= supernodes_per_node <= profile.gpus_per_node:
        raise ChemFLError(
            f"{where}: supernodes-per-node = {supernodes_per_node}, but a {profile.name} node has "
            f"{profile.gpus_per_node} {profile.device}(s) and each SuperNode gets its own; "
            f"set it between 1 and {profile.gpus_per_node}"
        )
    return supernodes_per_node


def _directives(table: dict[str, Any], is_local: bool, where: str) -> tuple[str, ...]:
    """Extra scheduler options, given without the #PBS / #SBATCH prefix the template adds."""
    directives = _strings(table, "directives", (), where)
    if directives and is_local:
        raise ChemFLError(f"{where}: profile local has no scheduler to read directives; remove directives")
    for line in directives:
        if not line.startswith("-"):
            raise ChemFLError(
                f'{where}: directive "{line}" should be the option alone, e.g. "-l place=scatter" '
                'or "--mail-type=END"; the #PBS / #SBATCH prefix is added'
            )
    return directives


def _data_path(table: dict[str, Any], is_local: bool, where: str) -> str:
    """The shard folder at the facility; a local one is on this machine, so it is checked and made absolute
    (the script then runs from anywhere)."""
    data_path = _path(table, "data-path", None, where)
    if not is_local:
        return data_path
    folder = Path(os.path.expandvars(os.path.expanduser(data_path)))
    if not folder.is_dir():
        raise ChemFLError(
            f'{where}: data-path "{data_path}" is not a folder on this machine; build the '
            "partitions (chemfl data build) and point data-path at this facility's shard folder"
        )
    return _quotable(str(folder.resolve()), "data-path", where)


def _backend(table: dict[str, Any], is_local: bool, where: str) -> tuple[str, str]:
    """(backend, globus-endpoint): a Globus facility must name the endpoint its jobs go to."""
    backend = _get(table, "backend", str, "cli", where)
    if backend not in BACKENDS:
        raise ChemFLError(f'{where}: backend "{backend}" is unknown; use one of {", ".join(BACKENDS)}')
    globus_endpoint = _get(table, "globus-endpoint", str, "", where)
    if backend == "globus":
        if is_local:
            raise ChemFLError(f'{where}: profile local runs with bash on this machine; set backend = "cli"')
        if not globus_endpoint:
            raise ChemFLError(
                f'{where}: backend = "globus" needs the endpoint to run on; add '
                'globus-endpoint = "<endpoint UUID>" (globus-compute-endpoint list shows it)'
            )
        try:
            uuid.UUID(globus_endpoint)
        except ValueError:
            raise ChemFLError(
                f'{where}: globus-endpoint "{globus_endpoint}" is not an endpoint id (a UUID); '
                "copy it from globus-compute-endpoint list"
            ) from None
    return backend, globus_endpoint


def _profile(table: dict[str, Any], where: str) -> Profile:
    """The named profile; a generic one with the file's gpus-per-node and gpu-pinning."""
    known = ", ".join(PROFILES)
    name = _get(table, "profile", str, "", where)
    if not name:
        raise ChemFLError(f'{where}: no profile; add profile = "<one of {known}>"')
    if name not in PROFILES:
        raise ChemFLError(
            f'{where}: profile "{name}" is unknown; use one of {known} '
            "(pbs, slurm and local are generic: set gpus-per-node and gpu-pinning yourself)"
        )
    profile = PROFILES[name]
    if not profile.generic:
        return profile
    gpus = _get(table, "gpus-per-node", int, profile.gpus_per_node, where)
    if gpus < 1:
        raise ChemFLError(f"{where}: gpus-per-node = {gpus}; set it to 1 or more")
    pinning = _get(table, "gpu-pinning", str, profile.gpu_pinning, where)
    if pinning not in GPU_PINNINGS:
        raise ChemFLError(f'{where}: gpu-pinning "{pinning}" is unknown; use one of {", ".join(GPU_PINNINGS)}')
    if pinning == "srun" and profile.scheduler != "slurm":
        raise ChemFLError(
            f'{where}: gpu-pinning "srun" needs Slurm, and profile {name} has none; use "cuda", "ze" or "none"'
        )
    return dataclasses.replace(profile, gpus_per_node=gpus, gpu_pinning=pinning)


def _walltime(table: dict[str, Any], profile: Profile, queue: str, where: str) -> int:
    text = _get(table, "walltime", str, "", where)
    if not text:
        raise ChemFLError(f'{where}: no walltime; add walltime = "HH:MM:SS", e.g. "01:00:00"')
    try:
        seconds = parse_walltime(text)
    except ValueError:
        raise ChemFLError(f'{where}: walltime "{text}" is malformed; write HH:MM:SS, e.g. "01:30:00"') from None
    if seconds <= 0:
        raise ChemFLError(f'{where}: walltime "{text}" is zero; give the job some time, e.g. "01:00:00"')
    cap = profile.queue_walltime_caps.get(queue)
    if cap is not None and seconds > cap:
        longer = [name for name, limit in profile.queue_walltime_caps.items() if limit >= seconds]
        fix = f"or queue = one of {', '.join(longer)}" if longer else "no other queue allows it either"
        raise ChemFLError(
            f"{where}: walltime {format_walltime(seconds)} is over queue {queue}'s cap of "
            f"{format_walltime(cap)}; pick a shorter walltime, {fix}"
        )
    return seconds


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    """table[key] checked against `kind` (bool is not an int here); `default` when absent, None = required."""
    if key not in table:
        if default is None:
            raise ChemFLError(f"{where}: {key} is missing; add {key} = ...")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(
            {
                "str": "a string",
                "int": "an integer",
                "float": "a number",
                "bool": "true or false",
                "dict": "a table ({...})",
                "list": "a list ([...])",
            }[k.__name__]
            for k in kinds
        )
        raise ChemFLError(f"{where}: {key} = {value!r} should be {wanted}")
    return value


def _strings(table: dict[str, Any], key: str, default: tuple[str, ...], where: str) -> tuple[str, ...]:
    value = _get(table, key, list, list(default), where)
    if not all(isinstance(item, str) for item in value):
        raise ChemFLError(f'{where}: {key} should be a list of strings, e.g. {key} = ["..."]')
    return tuple(value)


def _path(table: dict[str, Any], key: str, default: str | None, where: str) -> str:
    """A path rendered inside quotes at the facility: no quote or backslash characters."""
    value = _get(table, key, str, default, where)
    if default is None and not value:
        raise ChemFLError(f"{where}: {key} is empty; give the path")
    return _quotable(value, key, where)


def _quotable(path: str, key: str, where: str) -> str:
    if UNQUOTABLE.search(path):
        raise ChemFLError(
            f'{where}: {key} "{path}" contains a quote, backslash or backtick, which the '
            "rendered script cannot quote; move the folder to a plainer path"
        )
    return path


def _reject_unknown_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    """Typos would otherwise silently fall back to defaults (e.g. `wall-time` -> no walltime)."""
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"known keys: {', '.join(sorted(allowed))}"
            raise ChemFLError(f'{where}: unknown key "{key}"; {hint}')
