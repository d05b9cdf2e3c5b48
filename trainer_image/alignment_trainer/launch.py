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


def launch_env(cpu: bool = False) -> dict[str, str]:
    """Environment the launched command needs on top of the pod's/process's own."""
    env = {
        "PYTHONUNBUFFERED": "1",          # progress lines reach the parent as they are printed
        "TOKENIZERS_PARALLELISM": "false",  # no fork warnings from dataset.map workers
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"     # DeepSpeed's accelerator; it otherwise probes and warns
    return env


# ---------------------------------------------------------------------------- in the trainer process

def needs_configured_state() -> bool:
    """Several processes and no GPU: accelerate would count 1 process (see the module docstring)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def init_distributed() -> bool:
    """Set up accelerate's process state for CPU multi-process runs; True when it did."""
    if not needs_configured_state():
        return False
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed over gloo: backend given explicitly, cpu left False so DeepSpeed stays on.
        PartialState(backend="gloo")
    else:
        PartialState(cpu=True, backend="gloo")  # DDP on CPU, even without `accelerate launch --cpu`
    return True


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
