"""Built-in profiles: what a batch script needs to know about each machine.

A profile holds the facts that do not change between users of a machine: its scheduler, how many
accelerators a node has and how a process is pinned to one, the directives every job needs, the
queues' walltime caps, the outbound proxy and the usual environment modules. A facility in the
facilities file names a profile and adds what is the user's (account, queue, nodes, walltime).

The generic profiles (pbs, slurm, local) carry no site facts; the facilities file sets their
`gpus-per-node` and `gpu-pinning` (see chemfl.launcher.facilities).

Numbers are from each site's user guide as summarised in shared/notes/hpc.md; re-check them there
when a site changes its queues.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MINUTE = 60
HOUR = 60 * MINUTE

SCHEDULERS = ("pbs", "slurm", "local")
GPU_PINNINGS = ("cuda", "ze", "srun", "none")


@dataclass(frozen=True)
class Profile:
    """One machine's batch-script facts (or a generic scheduler's defaults)."""

    name: str
    scheduler: str  # "pbs" | "slurm" | "local"
    gpus_per_node: int  # accelerators a SuperNode can be pinned to: GPUs, tiles (Aurora), GCDs (Frontier)
    gpu_pinning: (
        str  # "cuda" (CUDA_VISIBLE_DEVICES) | "ze" (ZE_AFFINITY_MASK) | "srun" (one Slurm task per GPU) | "none"
    )
    device: str = "GPU"  # what one SuperNode gets, in the script's comments
    directives: tuple[str, ...] = ()  # lines every job needs beyond account, queue, nodes and walltime
    select_resources: str = ""  # PBS: appended to `select=<nodes>`
    queue_flag: str = ""  # Slurm: the option that names the queue, "--partition" or "--qos" (PBS: always -q)
    queue_flag_overrides: dict[str, str] = field(default_factory=dict)  # queues that take the other option
    queue_walltime_caps: dict[str, int] = field(
        default_factory=dict
    )  # queue -> longest walltime (s); unlisted: unchecked
    default_queue: str = ""
    default_proxy: str = ""  # outbound proxy of the compute nodes; "" = direct
    default_setup: tuple[str, ...] = ()  # shell lines that load the site's Python stack
    cpus_per_supernode: int = 0  # srun pinning: --cpus-per-task for each SuperNode (0: leave it to srun)
    generic: bool = False  # the facilities file may set gpus-per-node and gpu-pinning


ALCF_PROXY = "http://proxy.alcf.anl.gov:3128"  # hpc.md: ALCF compute nodes reach out only through it

PROFILES: dict[str, Profile] = {
    "polaris": Profile(
        name="polaris",
        scheduler="pbs",
        gpus_per_node=4,  # 4 x A100
        gpu_pinning="cuda",
        select_resources=":system=polaris",
        directives=("-l filesystems=home:eagle",),
        queue_walltime_caps={
            "debug": 1 * HOUR,  # ALCF Polaris "Running Jobs": 1-2 nodes, 1 h
            "debug-scaling": 1 * HOUR,  # same page: 1-10 nodes, 1 h
            "preemptable": 72 * HOUR,  # same page: 1-10 nodes, 72 h, may be killed by demand jobs
            "capacity": 168 * HOUR,  # hpc.md: 1-4 nodes, 168 h
            "prod": 24 * HOUR,  # same page: routing queue, 10-496 nodes, 24 h at most (3 h below 25 nodes)
        },
        default_queue="debug",
        default_proxy=ALCF_PROXY,
        default_setup=("module use /soft/modulefiles", "module load conda"),
    ),
    "aurora": Profile(
        name="aurora",
        scheduler="pbs",
        gpus_per_node=12,  # 6 x Max 1550, 2 tiles each: 12 xpu devices in FLAT mode
        gpu_pinning="ze",
        device="GPU tile",
        directives=("-l filesystems=home:flare",),
        queue_walltime_caps={
            "debug": 1 * HOUR,  # hpc.md (ALCF Aurora queues): 1-2 nodes, 1 h
            "capacity": 168 * HOUR,  # hpc.md: 1-16 nodes, 168 h
        },
        default_queue="debug",
        default_proxy=ALCF_PROXY,
        default_setup=("module load frameworks",),  # PyTorch with XPU
    ),
    "frontier": Profile(
        name="frontier",
        scheduler="slurm",
        gpus_per_node=8,  # 4 x MI250X, 2 GCDs each
        # GCD-to-core locality is irregular: srun's --gpu-bind=closest gets it right. One srun step with a
        # task per GCD, not one backgrounded step per GCD: concurrent steps block one another unless each
        # asks for exact CPU and memory shares, and a single step also spans nodes without nested sruns.
        gpu_pinning="srun",
        device="GCD",
        queue_flag="--partition",
        queue_flag_overrides={"debug": "--qos"},  # debug is a QOS inside the batch partition
        queue_walltime_caps={
            "debug": 2 * HOUR,  # hpc.md (OLCF Frontier guide): -q debug, 2 h
            "batch": 2 * HOUR,  # hpc.md: -p batch, 2 h for 1-91 nodes (bigger jobs may run longer)
            "extended": 24 * HOUR,  # hpc.md: -p extended, 24 h, one running job
        },
        default_queue="batch",
        default_proxy="http://proxy.ccs.ornl.gov:3128/",  # hpc.md (OLCF)
        default_setup=("module load PrgEnv-gnu rocm craype-accel-amd-gfx90a",),
        cpus_per_supernode=7,  # OLCF: 56 usable cores (low-noise mode) / 8 GCDs
    ),
    "perlmutter": Profile(
        name="perlmutter",
        scheduler="slurm",
        gpus_per_node=4,  # 4 x A100
        # CUDA_VISIBLE_DEVICES in the batch step, as on Polaris: A100 numbering is regular, and it avoids
        # running four concurrent job steps, which block one another unless each asks for exact shares.
        gpu_pinning="cuda",
        directives=("--constraint=gpu", "--gpus-per-node=4"),
        queue_flag="--qos",
        queue_walltime_caps={
            "debug": 30 * MINUTE,  # hpc.md (NERSC Perlmutter QOS table): debug, 30 min
            "regular": 48 * HOUR,  # same table: regular, 48 h
        },
        default_queue="debug",
        default_proxy="",  # hpc.md: compute nodes reportedly reach the internet directly
        default_setup=("module load conda",),
    ),
    "pbs": Profile(name="pbs", scheduler="pbs", gpus_per_node=1, gpu_pinning="cuda", generic=True),
    "slurm": Profile(
        name="slurm", scheduler="slurm", gpus_per_node=1, gpu_pinning="cuda", queue_flag="--partition", generic=True
    ),
    # A laptop or workstation without a scheduler: plain bash, one SuperNode unless told otherwise.
    "local": Profile(name="local", scheduler="local", gpus_per_node=1, gpu_pinning="none", device="slot", generic=True),
}
