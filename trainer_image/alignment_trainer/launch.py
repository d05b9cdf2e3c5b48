"""How a stage is launched: the command line, its environment, and the in-process fix-up.

The operator (Job rendering) and the local runner both call `build_launch_command` and
`launch_env`; the trainer calls `init_distributed` first thing. This module imports neither
torch nor accelerate at import time, so the operator can use it.

    build_launch_command("/etc/recipe/recipe.yaml", "deepspeed-zero3", num_processes=8)
    -> python -m alignment_trainer.launch --config_file .../accelerate/zero3.yaml --num_machines 1
       --machine_rank 0 --num_processes 8 -m alignment_trainer /etc/recipe/recipe.yaml

`python -m alignment_trainer.launch ARGS` is `accelerate launch ARGS` that exits with the
trainer's own exit code: accelerate's launcher exits 1 whenever a process fails, which would
turn the trainer's "fix the input" (2) into a retryable failure.

Why init_distributed exists (DeepSpeed on CPU, e.g. ZeRO-3 over gloo in tests and CI):
accelerate's PartialState, with LOCAL_RANK set and no GPU, finds no backend in
`_prepare_backend` (its GPU branch sees no device; its MULTI_CPU branch needs cpu=True, and
cpu=True switches DeepSpeed off in AcceleratorState). DeepSpeed still creates a 2-rank gloo
group, but with backend None PartialState records num_processes = 1, so the batch size
handed to DeepSpeed is wrong and TRL's metric gathers expect 1 tensor where 2 arrive.
transformers' TrainingArguments passes no backend on its DeepSpeed path. The fix: build
PartialState(backend="gloo") ourselves before any TRL config exists (num_processes then
comes from torch.distributed.get_world_size()), and tell TrainingArguments to adopt it with
accelerator_config.use_configured_state=True (see `configured_state_args`).
"""

from __future__ import annotations

import os
from pathlib import Path

# CRD names (StageSpec.distributed) and short names -> accelerate config files.
STRATEGIES = {
    "deepspeed-zero3": "zero3.yaml", "zero3": "zero3.yaml",
    "deepspeed-zero2": "zero2.yaml", "zero2": "zero2.yaml",
    "fsdp": "fsdp.yaml",
    "ddp": "ddp.yaml",
}
DEFAULT_PORT = 29500
# The world a stage is rendered for (nodes x processes per node), set in its pods' (and local
# processes') environment; each process compares the world it formed against it (check_world).
WORLD_ENV = "ALIGNMENT_WORLD_SIZE"


def accelerate_config_dir() -> Path:
    """trainer_image/accelerate/: beside the package in a checkout and in the image (editable install)."""
    env = os.environ.get("ALIGNMENT_ACCELERATE_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "accelerate"


def build_launch_command(recipe_path: str, strategy: str | None, num_processes: int, num_machines: int = 1,
                         machine_rank: int | str = 0, main_process_ip: str | None = None,
                         main_process_port: int | None = None, cpu: bool = False,
                         config_dir: str | Path | None = None) -> list[str]:
    """The argv that runs one stage on one machine.

    num_processes: processes on THIS machine (GPUs per node); the command passes accelerate the
    total, num_processes * num_machines. machine_rank may be a string such as
    "$(JOB_COMPLETION_INDEX)", which Kubernetes expands in a container's args. strategy None
    (or "none") with a single process runs plain `python -m alignment_trainer`. cpu: no GPUs
    (tests, CI, laptops): mixed precision off; the processes talk over gloo (init_distributed).
    config_dir: where the accelerate configs are on the machine that runs the command (the
    operator renders for the trainer image's /opt/alignment/accelerate); default: this checkout's.
    """
    total = num_processes * num_machines
    if num_processes < 1 or num_machines < 1:
        raise ValueError(f"num_processes ({num_processes}) and num_machines ({num_machines}) must be >= 1")
    if strategy in (None, "none"):
        if total != 1:
            raise ValueError(f"distributed: {total} processes need a strategy ({', '.join(sorted(STRATEGIES))})")
        return ["python", "-m", "alignment_trainer", str(recipe_path)]
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed: {strategy!r} is not one of {', '.join(sorted(STRATEGIES))}")
    if cpu and strategy == "fsdp":
        raise ValueError("distributed: fsdp needs GPUs; use ddp or deepspeed-zero3 on CPU")
    if num_machines > 1 and not main_process_ip:
        raise ValueError("main_process_ip: required with num_machines > 1 (the rank-0 pod's address)")

    configs = Path(config_dir) if config_dir else accelerate_config_dir()
    # `accelerate launch` itself exits 1 whatever its processes exit with; this module's main runs
    # it and exits with the trainer's own code (2: fix the input), which the podFailurePolicy reads.
    cmd = ["python", "-m", "alignment_trainer.launch", "--config_file", str(configs / STRATEGIES[strategy]),
           "--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
           "--num_processes", str(total)]
    if main_process_ip:
        cmd += ["--main_process_ip", main_process_ip, "--main_process_port", str(main_process_port or DEFAULT_PORT)]
    if cpu:
        # bf16 autocast on CPU is slow and not what the configs mean. No `--cpu`: accelerate then runs
        # ONE process (its multi-CPU path wants mpirun), and for DeepSpeed it would switch DeepSpeed
        # off; init_distributed puts the torchrun-started processes on gloo instead.
        cmd += ["--mixed_precision", "no"]
    return cmd + ["-m", "alignment_trainer", str(recipe_path)]


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set,
    else the driver's /proc entries (0 on a machine without the NVIDIA driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def launch_env(cpu: bool = False, threads: int | None = None, world_size: int | None = None) -> dict[str, str]:
    """Environment the launched command needs on top of the pod's/process's own. threads: the
    intra-op threads each process may use (thread_env); None leaves it to the trainer, which
    bounds itself by its cgroup's CPUs at start (bound_threads). world_size: the processes the
    stage is rendered for, over all its nodes (WORLD_ENV; the trainer fails a different world)."""
    env = {
        "PYTHONUNBUFFERED": "1",          # progress lines reach the parent as they are printed
        "TOKENIZERS_PARALLELISM": "false",  # no fork warnings from dataset.map workers
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"     # DeepSpeed's accelerator; it otherwise probes and warns
    if threads is not None:
        env.update(thread_env(threads))
    if world_size is not None:
        env[WORLD_ENV] = str(world_size)
    return env


# ---------------------------------------------------------------------------- CPU threads
# torch, OpenMP and MKL start one thread per core they see, in every process, whatever the pod's
# CPU limit or the other processes on the machine: on a busy 2-core box two spinning intra-op
# threads per process make each step several times slower than one. Each process gets the CPUs
# it really has: the cgroup's quota (a pod's CPU limit) or the cores it may run on, divided by
# the processes that share them.

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus(cgroup: str | Path = "/sys/fs/cgroup") -> float:
    """CPUs this process may use: its affinity mask, bounded by the cgroup's CPU quota (cgroup v2
    cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us), which is what a pod's CPU limit sets."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    root = Path(cgroup)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus
    if quota not in ("max", "-1") and float(period) > 0:
        cpus = min(cpus, float(quota) / float(period))
    return cpus


def busy_cpus(interval: float = 0.5, stat: str | Path = "/proc/stat") -> float:
    """CPUs other processes keep busy right now (the machine's whole load over `interval`
    seconds, from /proc/stat; 0 where it cannot be read)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path(stat).read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    import time

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / (total1 - total0))


def threads_per_process(processes: int, cpus: float | None = None) -> int:
    """Intra-op threads for each of `processes` processes sharing `cpus` CPUs (default: usable_cpus)."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, int(cpus // max(processes, 1)))


def thread_env(threads: int) -> dict[str, str]:
    """torch/OpenMP, MKL and tokenizers bounded to `threads` per process."""
    return {**{var: str(threads) for var in THREAD_VARS}, "TOKENIZERS_PARALLELISM": "false"}


def cpu_quantity(quantity) -> float | None:
    """A Kubernetes CPU quantity (2, "2", "500m", "1.5") in cores; None when unset or not a CPU count."""
    if quantity is None:
        return None
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------- in the trainer process

def bound_threads() -> int:
    """Bound this process's CPU threads; the number it uses. An OMP_NUM_THREADS already set (by the
    operator from the pod's CPU limit, by `alignctl run --local`, or by you) wins; otherwise the
    usable CPUs divided by the processes on this machine (LOCAL_WORLD_SIZE, set by accelerate/torchrun)."""
    import torch

    try:
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        threads = threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    for var, value in thread_env(threads).items():
        os.environ.setdefault(var, value)  # read by OpenMP/MKL/tokenizers in libraries loaded later
    torch.set_num_threads(threads)
    return threads


def needs_configured_state() -> bool:
    """Several processes and no GPU: accelerate would count 1 process (see the module docstring)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def skip_cpu_inference_comm_op() -> bool:
    """Without a GPU, tell DeepSpeed its shared-memory comm op is unavailable; True when it did.

    DeepSpeed's CPU accelerator compiles that op (C++, torch's JIT loader) whenever its process group
    starts, for `inference_all_reduce` alone: DeepSpeed inference's tensor-parallel layers, which no
    stage uses (ZeRO's collectives go through torch.distributed). The compile needs g++ and Python's
    headers, takes 24 s on an idle 2-core machine and up to 110 s on a busy one, is redone for every new
    virtual environment (the sources' path is part of the cache key) and was OOM-killed in a 3Gi pod.
    DeepSpeed decides from `deepspeed.ops.__compatible_ops__`, probed once per process and kept in the
    module for edits like this one; `inference_all_reduce` then uses torch.distributed.all_reduce."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


def init_distributed() -> bool:
    """Set up accelerate's process state for CPU multi-process runs; True when it did."""
    skip_cpu_inference_comm_op()
    if not needs_configured_state():
        return False
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed over gloo: backend given explicitly, cpu left False so DeepSpeed stays on.
        PartialState(backend="gloo")
    else:
        PartialState(cpu=True, backend="gloo")  # DDP on CPU, even without `accelerate launch --cpu`
    return True


class WorldSizeMismatch(Exception):
    """The processes formed a world of another size than the stage was rendered for: a rank launched
    alone, or nodes x processes that the launch did not honour. Training on it would be a silent
    wrong result (another batch size, another data split, ranks that never join)."""


def formed_world() -> int:
    """The world this process is in: torch.distributed's group when formed, else accelerate's state when
    built, else what the launcher (torchrun, via accelerate launch) told it (WORLD_SIZE; 1 when alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    from accelerate import PartialState

    if PartialState._shared_state:
        return PartialState().num_processes
    return int(os.environ.get("WORLD_SIZE") or 1)


def check_world(formed: int) -> None:
    """Raise WorldSizeMismatch when `formed` is not the world rendered for the stage (WORLD_ENV; unset:
    nothing to compare, e.g. a recipe run by hand)."""
    rendered = os.environ.get(WORLD_ENV, "").strip()
    if not rendered.isdigit() or int(rendered) == formed:
        return
    where = f"process {os.environ.get('RANK', '0')} on {os.uname().nodename}"  # a pod's hostname is its name
    raise WorldSizeMismatch(
        f"world size mismatch: the stage is rendered for {rendered} processes (nodes x processes per node) but "
        f"{where} formed a world of {formed}; no step was trained")


def configured_state_args() -> dict:
    """Training-arguments kwargs that make transformers adopt the state init_distributed built."""
    from accelerate import PartialState

    if PartialState._shared_state and PartialState().num_processes > 1 and needs_configured_state():
        return {"accelerator_config": {"use_configured_state": True}}
    return {}


# ---------------------------------------------------------------------------- the launcher

def main(argv: list[str] | None = None) -> int:
    """`accelerate launch ARGV`, exiting with the trainer's outcome code when it failed.

    The recipe is ARGV's last word; its termination_message_path holds the outcome the trainer's
    first failing process wrote (alignment_trainer.outcome). SIGTERM/SIGINT go on to accelerate,
    which stops its processes (a pod deleted or preempted: they exit "Interrupted").
    """
    import signal
    import subprocess
    import sys

    from . import outcome
    from .recipe import read_recipe_file

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return outcome.FIX_INPUT
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *argv])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    code = proc.wait()
    if code == 0:
        return 0
    try:
        path = read_recipe_file(argv[-1]).get("termination_message_path")
    except SystemExit:
        path = None
    said = outcome.decode(Path(path).read_text(errors="replace")) if path and Path(path).is_file() else None
    return int(said["exit_code"]) if said and isinstance(said.get("exit_code"), int) else code


if __name__ == "__main__":
    raise SystemExit(main())
