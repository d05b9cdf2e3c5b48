"""Run a whole AlignmentRun on this machine, stage after stage, as child processes.

    alignctl run --local examples/tiny-run.yaml [--workdir runs]

The workdir plays the run's volume: each stage's recipe is rendered exactly as the operator
renders it (build_recipe) into <workdir>/<namespace>/<run>/<stage>/recipe.yaml and run as
`python -m alignment_trainer recipe.yaml` (`accelerate launch` when the stage asks for several
processes), output in log.txt beside it. This process plays the cluster for the operator's own
state machine (reconcile): the status it computes is written to <workdir>/<namespace>/<run>/
status.json after every transition, in the resource's status shape.

Ctrl-C (or SIGTERM) stops the running stage and leaves it Pending, "interrupted"; running the
same command again skips the stages that succeeded and resumes the interrupted one from its
newest checkpoint (the trainer does that by itself).
Exit status: 0 the run succeeded, 1 a stage failed, 2 the run is invalid, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from alignment_operator.api import AlignmentRun, AlignmentRunStatus, Condition, RunInvalid, StageStatus, parse_run
from alignment_operator.cli import run_documents
from alignment_operator.reconcile import CreateStage, Event, ObservedChild, reconcile
from alignment_operator.render.recipe import build_recipe, stage_dir

from . import local_view as view
from .checkpoints import newest_checkpoint
from .launch import build_launch_command, launch_env

STOP_GRACE_S = 60  # how long a stage may take to stop after SIGINT before it is killed


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- the run and its status

def load_run(path: str) -> AlignmentRun:
    """The one AlignmentRun in a YAML file, validated as the API server would."""
    runs = run_documents(Path(path))
    if len(runs) != 1:
        raise RunInvalid([f"expected one AlignmentRun document, found {len(runs)}"], path)
    return parse_run(runs[0], path)


def read_status(run_dir: Path) -> AlignmentRunStatus | None:
    path = run_dir / "status.json"
    return AlignmentRunStatus.model_validate_json(path.read_text()) if path.is_file() else None


def write_status(run_dir: Path, status: AlignmentRunStatus) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status.wire(), indent=2) + "\n")
    os.replace(tmp, run_dir / "status.json")


def outputs_complete(run: AlignmentRun, index: int, root: str) -> bool:
    """A training stage left final/ and result.json; an eval stage result.json."""
    stage = run.spec.stages[index]
    out = Path(stage_dir(root, run, stage.name))
    return (out / "result.json").is_file() and (stage.method == "eval" or (out / "final").is_dir())


def prepare_rerun(run: AlignmentRun, root: str) -> None:
    """Running the command again retries a failed stage, and a stage recorded Succeeded whose
    outputs are gone (deleted by hand); the stages that succeeded stay done."""
    for i, st in enumerate(run.status.stages if run.status else []):
        if i >= len(run.spec.stages):
            break
        if st.phase == "Succeeded" and not outputs_complete(run, i, root):
            print(f"stage {st.name}: recorded Succeeded but its outputs are gone; running it again")
            run.status.stages[i] = StageStatus(name=st.name)
        elif st.phase == "Failed":
            print(f"stage {st.name}: failed before ({view.clip(st.message or '', 160)}); trying again")
            run.status.stages[i] = StageStatus(name=st.name, attempts=st.attempts)


def mark_interrupted(status: AlignmentRunStatus, index: int, signame: str, last: dict, out: Path) -> None:
    """The stopped stage goes back to Pending with a message saying how to go on."""
    st = status.stages[index]
    where = f" at step {last['step']}/{last['total']}" if "step" in last and not last.get("task") else ""
    resume = newest_checkpoint(out)
    st.phase, st.completion_time, st.attempts = "Pending", None, st.attempts + 1
    st.message = (f"interrupted ({signame}){where}; run the same command again to resume"
                  + (f" from {Path(resume).name}" if resume else ""))
    status.phase = "Pending"
    stopped = Condition(type="Progressing", status="False", reason="Interrupted",
                        message=f"stage {st.name}: {st.message}", last_transition_time=now())
    status.conditions = [stopped if c.type == "Progressing" else c for c in status.conditions]


# ---------------------------------------------------------------------------- one stage

def stage_command(run: AlignmentRun, index: int, recipe_path: Path) -> tuple[list[str], dict[str, str]]:
    """The child's argv and environment: one process, or accelerate launch for several."""
    r = run.spec.stages[index].resources
    gpus = 0
    if r.gpus_per_node:
        import torch

        gpus = min(r.gpus_per_node, torch.cuda.device_count())
        if gpus < r.gpus_per_node:
            print(f"  note: the stage asks for {r.gpus_per_node} GPUs per node, this machine has {gpus}")
    if r.nodes > 1:
        print(f"  note: the stage asks for {r.nodes} nodes; running it on this machine only")
    processes = r.processes_per_node or gpus or 1
    env = {**os.environ, **launch_env(cpu=gpus == 0), "PYTHONUNBUFFERED": "1"}
    for var in run.spec.trainer.env:  # the run's own variables, as its pods get them (plain values only)
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var.get("name") not in os.environ:
            print(f"  note: trainer.env {var.get('name')}: valueFrom is not resolved locally; set it in your environment")
    if processes == 1:
        return [sys.executable, "-m", "alignment_trainer", str(recipe_path)], env
    cmd = build_launch_command(str(recipe_path), run.spec.stages[index].distributed, processes, cpu=gpus == 0)
    beside = Path(sys.executable).with_name("accelerate")
    return [str(beside) if beside.exists() else shutil.which("accelerate") or "accelerate", *cmd[1:]], env


def run_stage(run: AlignmentRun, index: int, root: str, attempts: int, started: str) -> ObservedChild:
    """Render the recipe, run the stage to its end, and report it as the cluster would a Job."""
    stage = run.spec.stages[index]
    out = Path(stage_dir(root, run, stage.name))
    out.mkdir(parents=True, exist_ok=True)
    name = f"{run.metadata.name}-{stage.name}"
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(build_recipe(run, index, root).dump())
    try:
        cmd, env = stage_command(run, index, recipe_path)
    except ValueError as e:
        return ObservedChild(stage.name, name, "Failed", attempts, started, now(), message=str(e))

    bar = view.ProgressBar(stage.name)
    with (out / "log.txt").open("a") as log:
        log.write(f"=== {now()} attempt {attempts}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, start_new_session=True)  # own process group: we forward signals
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        try:
            _follow(lines, log, bar)
            code = proc.wait()
        except Interrupted as e:
            bar.close()
            print(f"\n{e}: stopping stage {stage.name} (pid {proc.pid}) ...", flush=True)
            _stop(proc, e.signum)
            _drain(lines, log)
            e.last = bar.last
            raise
        bar.close()

    if code == 0 and (out / "result.json").is_file():
        result = json.loads((out / "result.json").read_text())
        return ObservedChild(stage.name, name, "Succeeded", attempts, started, now(), result=result)
    text = (out / "log.txt").read_text().splitlines()
    text = text[max(i for i, line in enumerate(text) if line.startswith("=== ")):]  # this attempt's
    view.show_tail(text, out / "log.txt")
    why = view.error_message(text) if code else "exited 0 without writing result.json"
    return ObservedChild(stage.name, name, "Failed", attempts, started, now(), message=f"exit code {code}: {why}")


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _follow(lines: queue.Queue, log, bar: view.ProgressBar) -> None:
    """Every line to log.txt; JSON event lines to the progress bar; returns at end of output."""
    while True:
        try:
            line = lines.get(timeout=0.5)  # short waits keep Ctrl-C responsive
        except queue.Empty:
            continue
        if line is None:
            return
        log.write(line)
        log.flush()
        bar.event(view.parse_event(line))


def _drain(lines: queue.Queue, log) -> None:
    """What a stopped stage printed last, into log.txt (never blocking for long)."""
    try:
        while (line := lines.get(timeout=5)) is not None:
            log.write(line)
    except (queue.Empty, Interrupted):
        pass


def _stop(proc: subprocess.Popen, signum: int) -> None:
    """Forward the signal to the stage's process group; kill it if it does not stop in time."""
    for sig, wait in ((signum, STOP_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except Interrupted:  # asked twice: kill now
            continue


# ---------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignctl run --local", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="AlignmentRun manifest")
    parser.add_argument("--workdir", default="runs", help="where stage outputs and status.json go (default: runs/)")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.file)
    except RunInvalid as e:
        print(f"ERR {e}", file=sys.stderr)
        return 2
    root = os.path.abspath(args.workdir)
    run_dir = Path(stage_dir(root, run, "-")).parent
    run.status = read_status(run_dir)
    prepare_rerun(run, root)
    view.announce(run, run_dir)

    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    observed: dict[str, ObservedChild] = {}
    try:
        while True:
            outcome = reconcile(run, None, observed, now())
            run.status = outcome.status
            write_status(run_dir, run.status)
            for event in (a for a in outcome.actions if isinstance(a, Event)):
                print(f"{'!' if event.type == 'Warning' else '-'} {view.clip(event.message)}", flush=True)
            start = next((a for a in outcome.actions if isinstance(a, CreateStage)), None)
            if start is None:
                break
            st = run.status.stages[start.index]
            try:
                observed[st.name] = run_stage(run, start.index, root, st.attempts + 1, st.start_time or now())
            except Interrupted as e:
                out = Path(stage_dir(root, run, st.name))
                mark_interrupted(run.status, start.index, str(e), getattr(e, "last", {}), out)
                write_status(run_dir, run.status)
                print(f"stage {st.name}: {run.status.stages[start.index].message}")
                return 130
    except Interrupted:
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    curves = view.write_curves(run, run_dir)
    view.summary(run, run.status, run_dir, curves)
    return 0 if run.status.phase == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
