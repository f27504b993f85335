"""Built-in profiles: what a batch script needs to know about each machine.

A profile holds the facts that do not change between users of a machine: its scheduler, how many
accelerators a node has and how a process is pinned to one, the directives every job needs, the
queues' walltime caps and node limits, the outbound proxy, the usual environment modules, and, for
the per-job layout, how the site launches one rank per GPU across nodes (`chemfl trainer`) and which
collective-communication settings it documents. A facility in the facilities file names a profile
and adds what is the user's (account, queue, nodes, walltime).

The generic profiles (pbs, slurm, local) carry no site facts; the facilities file sets their
`gpus-per-node` and `gpu-pinning` (see chemfl.launcher.facilities), and their trainer launch is
derived from the closest site (chemfl.launcher.render.trainer_launch).

Numbers and settings are from each site's user guide as summarised in shared/notes/hpc.md (cited
as "hpc.md" next to each); re-check them there when a site changes its queues or its software. A
setting the brief or a site guide mentions but hpc.md does not record is left out, with a comment
saying so, rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MINUTE = 60
HOUR = 60 * MINUTE

SCHEDULERS = ("pbs", "slurm", "local")
GPU_PINNINGS = ("cuda", "ze", "srun", "none")
LAYOUTS = ("per-job", "per-gpu")  # one SuperNode + one trainer per job | one SuperNode per GPU
TRAINER_BACKENDS = ("auto", "nccl", "gloo", "xccl", "ccl")  # `chemfl trainer --backend`
MODEL_LOAD_SECONDS = 30 * MINUTE  # default wait for `trainer ready in` (loading the model on every rank)


@dataclass(frozen=True)
class Setting:
    """One environment variable the trainer's collectives need, and where the value comes from."""

    name: str
    value: str  # rendered inside double quotes: $VARIABLES expand at the facility
    source: str  # shown next to the export in the script


@dataclass(frozen=True)
class NetPlugin:
    """A collective library's network plugin: without it, traffic falls back to TCP sockets."""

    library: str  # glob looked for on LD_LIBRARY_PATH, e.g. "libnccl-net*.so"
    fix: str  # how to get it there (shown in the job log when it is missing)
    needs_it: tuple[str, ...] = ()  # settings that make the library fail without the plugin: unset then


@dataclass(frozen=True)
class Profile:
    """One machine's batch-script facts (or a generic scheduler's defaults)."""

    name: str
    scheduler: str  # "pbs" | "slurm" | "local"
    gpus_per_node: int  # accelerators a SuperNode / trainer rank gets: GPUs, tiles (Aurora), GCDs (Frontier)
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
    queue_node_limits: dict[str, tuple[int, int | None]] = field(
        default_factory=dict
    )  # queue -> (fewest, most nodes; None = no upper limit known); unlisted: unchecked
    no_resubmit_queues: dict[str, str] = field(default_factory=dict)  # queue -> why jobs there may not be chained
    submit_outside_home: str = ""  # non-empty: jobs must be submitted from outside $HOME (why, with the source)
    default_queue: str = ""
    default_proxy: str = ""  # outbound proxy of the compute nodes; "" = direct
    default_setup: tuple[str, ...] = ()  # shell lines that load the site's Python stack
    setup_required: str = ""  # non-empty: the facility must give its own setup lines (why)
    pinned_modules: tuple[str, ...] = ()  # modules that setup lines must load with an explicit version
    cpus_per_supernode: int = 0  # srun pinning: --cpus-per-task for each SuperNode (0: leave it to srun)
    node_local_dirs: tuple[Setting, ...] = ()  # per-job node-local folders (value: a subfolder of the job's dir)
    generic: bool = False  # the facilities file may set gpus-per-node and gpu-pinning
    # --- the per-job layout: one `chemfl trainer` rank per GPU (tile, GCD) across the job's nodes
    trainer_backend: str = "auto"  # torch.distributed backend (`chemfl trainer --backend`)
    trainer_launch: str = ""  # launcher line; {nodes} {ranks} {per_node} are filled in; "" = derived (generic)
    trainer_launch_source: str = ""
    trainer_directives: tuple[str, ...] = ()  # extra scheduler lines for per-job jobs
    trainer_modules: tuple[str, ...] = ()  # modules loaded before the trainer starts (a failed load only warns)
    trainer_env: tuple[Setting, ...] = ()  # collective settings, exported before the trainer starts
    net_plugin: NetPlugin | None = None
    master_addr: str = ""  # shell expression for MASTER_ADDR; "" = the trainer's own default
    rank_from_pals: bool = False  # mpiexec is Cray PALS: make sure PMI_RANK / PMI_SIZE are set for each rank
    model_load_seconds: int = MODEL_LOAD_SECONDS  # wait this long for `trainer ready in` before failing the job


ALCF_PROXY = "http://proxy.alcf.anl.gov:3128"  # hpc.md: ALCF compute nodes reach out only through it
ALCF_NCCL = "hpc.md: ALCF Polaris NCCL page"
ALCF_CCL = "hpc.md: ALCF Aurora guide (oneCCL)"
OLCF = "hpc.md: OLCF Frontier guide"
PBS_HEAD_NODE = '$(head -n 1 "${PBS_NODEFILE:-/dev/null}")'  # the first node of a PBS job: where rank 0 runs
# hpc.md (Aurora): one rank per tile, each bound to its own cores (cores 0-3 and 52-55 are left to the OS)
AURORA_CPU_BIND = "list:4-7:8-11:12-15:16-19:20-23:24-27:56-59:60-63:64-67:68-71:72-75:76-79"

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
        queue_node_limits={
            "debug": (1, 2),  # hpc.md: debug 1-2 nodes
            "debug-scaling": (1, 10),  # ALCF Polaris "Running Jobs" (as above; not in hpc.md): 1-10 nodes
            "preemptable": (1, 10),  # ALCF Polaris "Running Jobs" (as above; not in hpc.md): 1-10 nodes
            "capacity": (1, 4),  # hpc.md: capacity 1-4 nodes
            # hpc.md: prod needs >= 10 nodes; a job it cannot route gets an id and then vanishes
            # ("qstat: Unknown Job Id"). 496 at most: ALCF "Running Jobs" (not in hpc.md).
            "prod": (10, 496),
        },
        default_queue="debug",
        default_proxy=ALCF_PROXY,
        default_setup=("module use /soft/modulefiles", "module load conda"),
        trainer_backend="nccl",
        # hpc.md: ALCF documents `mpiexec -n 8 --ppn 4 --depth 8 --cpu-bind depth --envall python train.py` (PALS)
        trainer_launch="mpiexec -n {ranks} --ppn {per_node} --depth=8 --cpu-bind depth --envall",
        trainer_launch_source="hpc.md: ALCF Polaris, mpiexec (Cray PALS) with a CPU binding and --envall",
        trainer_env=(
            Setting("NCCL_NET_GDR_LEVEL", "PHB", ALCF_NCCL),
            Setting("NCCL_CROSS_NIC", "1", ALCF_NCCL),
            Setting("NCCL_COLLNET_ENABLE", "1", ALCF_NCCL),
            Setting("NCCL_NET", "AWS Libfabric", ALCF_NCCL + "; needs the aws-ofi-nccl plugin, see below"),
            # hpc.md: ALCF warns that some applications hang with the next three: drop them with
            # trainer-env = { FI_CXI_DISABLE_HOST_REGISTER = "" } (etc.) if the trainer hangs.
            Setting("FI_CXI_DISABLE_HOST_REGISTER", "1", ALCF_NCCL + " (ALCF: some apps hang with it)"),
            Setting("FI_MR_CACHE_MONITOR", "userfaultfd", ALCF_NCCL + " (ALCF: some apps hang with it)"),
            Setting("FI_CXI_DEFAULT_CQ_SIZE", "131072", ALCF_NCCL + " (ALCF: some apps hang with it)"),
        ),
        # hpc.md: "the aws-ofi-nccl plugin on LD_LIBRARY_PATH" -- but not its path, which depends on the
        # installed version: it is not set here. The script looks for it and, without it, unsets NCCL_NET
        # (NCCL would otherwise refuse to start) so that NCCL falls back to TCP sockets, with a warning.
        net_plugin=NetPlugin(
            library="libnccl-net*.so",
            fix="add the aws-ofi-nccl plugin's lib folder to LD_LIBRARY_PATH in the facility's setup lines "
            "(ALCF's Polaris NCCL page gives the path; hpc.md does not record it)",
            needs_it=("NCCL_NET",),
        ),
        master_addr=PBS_HEAD_NODE,  # hpc.md: MASTER_ADDR=$(head -1 $PBS_NODEFILE)
        rank_from_pals=True,
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
        queue_node_limits={
            "debug": (1, 2),  # hpc.md: debug 1-2 nodes
            "debug-scaling": (2, None),  # hpc.md: debug-scaling >= 2 nodes (its upper limit is not in hpc.md)
            "capacity": (1, 16),  # hpc.md: capacity 1-16 nodes
            "prod": (256, None),  # hpc.md: prod >= 256 nodes
        },
        submit_outside_home="ALCF's Aurora guide (hpc.md): submit jobs from the project directory, not home",
        default_queue="debug",
        default_proxy=ALCF_PROXY,
        default_setup=("module load frameworks",),  # PyTorch with XPU
        trainer_backend="xccl",  # hpc.md: recent frameworks modules dropped torch_ccl; torch.distributed has xccl
        # hpc.md: one rank per tile, `mpiexec -n 24 --ppn 12 --pmi=pmix --envall` with a CPU binding per tile
        trainer_launch="mpiexec -n {ranks} --ppn {per_node} --pmi=pmix --cpu-bind " + AURORA_CPU_BIND + " --envall",
        trainer_launch_source="hpc.md: ALCF Aurora, one rank per tile, PMIx, a CPU binding per tile, --envall",
        trainer_env=(
            Setting("CCL_PROCESS_LAUNCHER", "pmix", ALCF_CCL),
            Setting("CCL_ATL_TRANSPORT", "mpi", ALCF_CCL),
            Setting("CCL_KVS_MODE", "mpi", ALCF_CCL),
            Setting("FI_MR_CACHE_MONITOR", "userfaultfd", ALCF_CCL),
        ),
        # hpc.md: MASTER_ADDR=<rank-0 host>.hsn.cm.aurora.alcf.anl.gov (the Slingshot name of the first node)
        master_addr='$(head -n 1 "${PBS_NODEFILE:-/dev/null}" | cut -d. -f1).hsn.cm.aurora.alcf.anl.gov',
        rank_from_pals=True,
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
        queue_node_limits={
            "extended": (1, 64),  # hpc.md: -p extended allows at most 64 nodes
        },
        no_resubmit_queues={
            "debug": "OLCF's debug QOS forbids job chaining and resubmission (hpc.md, OLCF Frontier guide)",
        },
        default_queue="batch",
        default_proxy="http://proxy.ccs.ornl.gov:3128/",  # hpc.md (OLCF)
        # hpc.md: `module load PrgEnv-gnu rocm craype-accel-amd-gfx90a`, with the ROCm module pinned to the
        # version of the ROCm torch wheel -- which only the user knows, so there is no default setup.
        setup_required="Frontier's ROCm module must be pinned to the ROCm version of your torch wheel "
        '(hpc.md, OLCF); add setup = ["module load PrgEnv-gnu rocm/<X.Y.Z> craype-accel-amd-gfx90a", '
        '"source ~/chemfl/.venv/bin/activate"] with <X.Y.Z> from python -c "import torch; print(torch.version.hip)"',
        pinned_modules=("rocm",),
        cpus_per_supernode=7,  # OLCF: 56 usable cores (low-noise mode) / 8 GCDs; hpc.md: srun -c7
        # hpc.md: MIOPEN_USER_DB_PATH=/tmp/... (MIOpen disk errors otherwise); node-local, one per job.
        # MIOPEN_CUSTOM_CACHE_DIR beside it: OLCF's guide sets both (hpc.md records the first only).
        node_local_dirs=(
            Setting("MIOPEN_USER_DB_PATH", "miopen", OLCF + ": MIOpen disk errors otherwise"),
            Setting("MIOPEN_CUSTOM_CACHE_DIR", "miopen", "beside MIOPEN_USER_DB_PATH as OLCF does; not in hpc.md"),
        ),
        trainer_backend="nccl",  # RCCL behind torch's nccl backend
        # hpc.md: `srun -N2 -n16 -c7 --gpus-per-task=1 --gpu-bind=closest python ...`; OLCF discourages torchrun
        trainer_launch="srun --nodes={nodes} --ntasks={ranks} --ntasks-per-node={per_node} --cpus-per-task=7 "
        "--gpus-per-task=1 --gpu-bind=closest",
        trainer_launch_source="hpc.md: OLCF Frontier, one task per GCD bound to its closest cores",
        trainer_directives=("--network=disable_rdzv_get",),  # hpc.md: #SBATCH --network=disable_rdzv_get (RCCL)
        trainer_modules=("rccl-net-plugin",),  # hpc.md: otherwise RCCL falls back to TCP sockets
        trainer_env=(
            Setting("NCCL_SOCKET_IFNAME", "hsn0,hsn1,hsn2,hsn3", OLCF),
            # FI_CXI_ATS=0 and FI_MR_CACHE_MONITOR are part of OLCF's RCCL recipe too, but hpc.md does not
            # record them or their values: not set here. Add them with trainer-env once checked at OLCF.
        ),
        net_plugin=NetPlugin(
            library="lib*ccl-net*.so",
            fix="module load rccl-net-plugin (hpc.md, OLCF), or put the aws-ofi-rccl plugin on LD_LIBRARY_PATH",
        ),
        master_addr="$(hostname -i | cut -d' ' -f1)",  # hpc.md: MASTER_ADDR=$(hostname -i) of the first node
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
        trainer_backend="nccl",
        # hpc.md: `srun --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=32`, ranks from SLURM_PROCID,
        # SLURM_LOCALID, SLURM_NTASKS; MASTER_ADDR = the first host of the job (the trainer's own default)
        trainer_launch="srun --nodes={nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} "
        "--cpus-per-task=32",
        trainer_launch_source="hpc.md: NERSC Perlmutter, one task per GPU, 32 CPUs each",
        # No NCCL settings: hpc.md records none for Perlmutter (NERSC's PyTorch modules set up NCCL
        # themselves); add any with trainer-env.
    ),
    "pbs": Profile(name="pbs", scheduler="pbs", gpus_per_node=1, gpu_pinning="cuda", generic=True),
    "slurm": Profile(
        name="slurm", scheduler="slurm", gpus_per_node=1, gpu_pinning="cuda", queue_flag="--partition", generic=True
    ),
    # A laptop or workstation without a scheduler: plain bash, one SuperNode unless told otherwise.
    "local": Profile(name="local", scheduler="local", gpus_per_node=1, gpu_pinning="none", device="slot", generic=True),
}
