"""The local shell: a whole AlignmentRun on this machine, stage after stage, as child processes.

    alignctl run --local examples/tiny-run.yaml [--workdir runs] [--set PATH=VALUE] [--from STAGE] [--redo STAGE]

The workdir plays the run's volume: each stage's recipe is rendered exactly as the operator
renders it (build_recipe) into <workdir>/<namespace>/<run>/<stage>/recipe.yaml and run as
`python -m alignment_trainer recipe.yaml` (`accelerate launch` when the stage asks for several
processes), output in log.txt beside it. This process plays the cluster for the operator's own
state machine: what a child did goes into `reconcile` as an ObservedChild, exactly as the
cluster shell reports a Job, and the status it computes is written to
<workdir>/<namespace>/<run>/status.json after every transition, in the resource's status shape.

Running the command again is a retry request (the run's alignment.dev/retry annotation, as on
a cluster): succeeded stages are skipped, a failed or interrupted stage runs again and resumes
from its newest checkpoint (the trainer does that by itself). Ctrl-C (or SIGTERM) stops the
running stage; reconcile records it Pending, "interrupted".
Before anything starts: --set overrides are applied and the run validated as the API server would,
the local paths it names are checked (paths.py), the run directory is locked for this process
(lock.py: a second run --local of the same run exits 2 naming the first), and --from/--redo or an
edit to a stage that already succeeded are resolved (plan.py: the edit is refused unless redone).
Each stage's processes get the CPU threads this machine has free when the stage starts.
Exit status: 0 the run succeeded, 1 a stage failed, 2 fix the input (the run, a path, a request)
or the run is in use, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from alignment_trainer import outcome
from alignment_trainer.checkpoints import newest_checkpoint
from alignment_trainer.launch import (build_launch_command, busy_cpus, launch_env, threads_per_process, usable_cpus,
                                      visible_gpus)

from .. import health, progress
from ..api import RETRY_ANNOTATION, AlignmentRun, AlignmentRunStatus, RunInvalid, parse_run, run_documents
from ..api.status import CheckpointRef
from ..graph import inputs
from ..reconcile import CreateStage, DeleteChild, Event, ObservedChild, attempt_run, reconcile
from ..identity import child_name
from ..render.recipe import build_recipe, stage_dir
from . import exports, plan, view
from .lock import RunLock, RunLocked
from .overrides import apply_overrides
from .paths import path_problems
from .plan import PlanError, to_redo

STOP_GRACE_S = 60  # how long a stage may take to stop after SIGINT before it is killed
OUTCOME_FILE = "termination-message.json"  # the stage's termination message path, on the "volume"


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- status.json

def read_status(run_dir: Path) -> AlignmentRunStatus | None:
    path = run_dir / "status.json"
    return AlignmentRunStatus.model_validate_json(path.read_text()) if path.is_file() else None


STATUS_LOCK = threading.RLock()  # status.json and run.status: the main loop and each running stage's progress


def write_status(run_dir: Path, status: AlignmentRunStatus) -> None:
    with STATUS_LOCK:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status.wire(), indent=2) + "\n")
        os.replace(tmp, run_dir / "status.json")


def warn_missing_outputs(run: AlignmentRun, root: str) -> None:
    """A stage recorded Succeeded whose final/ was deleted by hand: its successors would fail."""
    for spec, st in zip(run.spec.stages, run.status.stages if run.status else []):
        out = Path(stage_dir(root, run, spec.name))
        if st.phase == "Succeeded" and spec.method != "eval" and not (out / "final").is_dir():
            print(f"! stage {spec.name}: recorded Succeeded but {view.rel(out / 'final')} is gone; delete "
                  f"{view.rel(out.parent / 'status.json')} to run the whole run again", file=sys.stderr)


class LiveStatus:
    """A stage's progress lines into status.json's stages[i].progress and progressSummary, the
    fields the operator writes from the trainer's pushes (at most every 5 s, and the last one)."""

    def __init__(self, run: AlignmentRun, index: int, run_dir: Path):
        self.run, self.index, self.run_dir = run, index, run_dir
        self.written = -float("inf")
        self.active: float | None = None  # when training last reported a step, a heartbeat or a checkpoint

    def event(self, ev: dict | None) -> None:
        if ev and ev.get("event") in ("progress", "heartbeat", "checkpoint") and not ev.get("task"):
            self.active = time.monotonic()  # training moves (HangWatch); evaluation tasks have no hang clock
        if ev and ev.get("event") == "checkpoint" and self.run.status is not None and isinstance(ev.get("step"), int):
            # The trainer's own path of its newest complete checkpoint (the operator derives it from progress)
            self.run.status.stages[self.index].latest_checkpoint = CheckpointRef(
                step=ev["step"], path=str(ev.get("path")), time=ev.get("time"), complete=bool(ev.get("complete")))
            write_status(self.run_dir, self.run.status)
            return
        if not ev or ev.get("event") != "progress" or ev.get("task") or self.run.status is None:
            return  # evaluation tasks report their own steps, not training progress
        step, total, now = ev.get("step"), ev.get("total"), time.monotonic()
        if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
            return
        # The trainer's own figures (alignment_trainer.pace): eta_seconds, and step_seconds and
        # tokens_per_second among the metrics, as its push carries them on a cluster
        ev = dict(ev)
        eta = ev.pop("eta_seconds", None)
        with STATUS_LOCK:
            self._record(ev, eta if isinstance(eta, int) else None, step, total, now)

    def _record(self, ev: dict, eta, step: int, total: int, now: float) -> None:
        st = self.run.status.stages[self.index]
        st.progress = progress.from_event(ev, eta, datetime.now(timezone.utc), st.progress)
        learning = health.warnings(st.progress, self.run.spec.stages[self.index].guards)
        for line in (w for w in learning if w not in st.warnings):  # learning nothing: said once, with the figure
            print(f"\n! stage {st.name}: {line}", flush=True)
        st.warnings = learning
        self.run.status.progress_summary = progress.summary(
            self.run.status.stages, sum(s.phase == "Succeeded" for s in self.run.status.stages))
        if now - self.written >= progress.MIN_WRITE_INTERVAL_S or step >= total:
            write_status(self.run_dir, self.run.status)
            self.written = now


# ---------------------------------------------------------------------------- one stage

def stage_command(run: AlignmentRun, index: int, recipe_path: Path, share: int = 1) -> tuple[list[str], dict[str, str]]:
    """The child's argv and environment: one process, or accelerate launch for several; `share`: stages running
    side by side, which divide the free cores between them."""
    r = run.spec.stages[index].resources
    gpus = min(r.gpus_per_node, visible_gpus()) if r.gpus_per_node else 0
    if gpus < r.gpus_per_node:
        print(f"  note: the stage asks for {r.gpus_per_node} GPUs per node, this machine has {gpus}")
    if r.nodes > 1:
        print(f"  note: the stage asks for {r.nodes} nodes; running it on this machine only")
    processes = r.processes_per_node or gpus or 1
    # The world is this machine's processes: a stage of several nodes runs here on one.
    env = {**os.environ, **launch_env(cpu=gpus == 0, threads=local_threads(processes, share=share), world_size=processes),
           "PYTHONUNBUFFERED": "1"}
    for var in run.spec.trainer.env:  # the run's own variables, as its pods get them (plain values only)
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var.get("name") not in os.environ:
            print(f"  note: trainer.env {var.get('name')}: valueFrom is not resolved locally; set it in your environment")
    if processes == 1:
        return [sys.executable, "-m", "alignment_trainer", str(recipe_path)], env
    cmd = build_launch_command(str(recipe_path), run.spec.stages[index].distributed, processes, cpu=gpus == 0)
    return [sys.executable, *cmd[1:]], env  # this environment's python, as the pods use the image's


def local_threads(processes: int, quiet: bool = False, share: int = 1) -> int:
    """CPU threads per process for a stage here: the cores this process may use, less those other
    work keeps busy right now, divided by the stage's processes (and by `share`, the stages running side
    by side); OMP_NUM_THREADS when you set it."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
        if not quiet:
            print(f"  cpu: {threads} thread(s) per process (OMP_NUM_THREADS)")
        return threads
    usable, busy = usable_cpus(), busy_cpus()
    free = max(1.0, min(usable, (os.cpu_count() or 1) - busy))
    threads = threads_per_process(processes, max(1.0, free / max(1, share)))
    if not quiet:
        print(f"  cpu: {threads} thread(s) per process ({usable:g} usable cores, {busy:.1f} busy with other work, "
              f"{processes} process(es)" + (f", {share} stages side by side" if share > 1 else "") + ")")
    return threads


class Stop:
    """Asks a stage running in a thread to stop (the signal the main thread got), as Ctrl-C stops one."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def run_stage(run: AlignmentRun, index: int, root: str, started: str, stop: Stop | None = None,
              share: int = 1, tty: bool | None = None, on_start=None) -> ObservedChild:
    """Render the recipe, run the stage to its end, and report it as the cluster shell reports a Job.
    In a thread beside others: `stop` asks it to stop, `share` divides the cores, `tty` False prints lines
    instead of redrawing a bar, `on_start(pid)` is told its process."""
    stage = run.spec.stages[index]
    out = Path(stage_dir(root, run, stage.name))
    out.mkdir(parents=True, exist_ok=True)
    name = child_name(run, stage.name)
    message_path = out / OUTCOME_FILE
    message_path.unlink(missing_ok=True)  # only this attempt's outcome counts
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(build_recipe(run, index, root, termination_message_path=str(message_path)).dump())
    held = min(stage.resources.gpus_per_node, visible_gpus())  # this machine's, for gpuSeconds (one node here)
    child = lambda state, **kw: ObservedChild(stage.name, name, state, 1, kind="process",  # noqa: E731
                                              created=started, finished=now(), gpus=held, **kw)
    try:
        cmd, env = stage_command(run, index, recipe_path, share)
    except ValueError as e:
        return child("Failed", message=f"RecipeError: {e}")

    bar = view.ProgressBar(stage.name, tty=tty)
    live = LiveStatus(run, index, out.parent)
    with (out / "log.txt").open("a") as log:
        log.write(f"=== {now()} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, start_new_session=True)  # own process group: we forward signals
        if on_start is not None:
            on_start(proc.pid)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        watch = HangWatch(run, index, live, proc)
        threading.Thread(target=watch.watch, daemon=True).start()
        try:
            _follow(lines, log, bar, live, stop)
            code = proc.wait()
        except Interrupted as e:
            bar.close()
            print(f"\n{e}: stopping stage {stage.name} (pid {proc.pid}) ...", flush=True)
            _stop(proc, e.signum)
            _drain(lines, log)
            last = bar.last
            where = f" at step {last['step']}/{last['total']}" if "step" in last and not last.get("task") else ""
            resume = newest_checkpoint(out)
            return child("Interrupted", message=f"{e}{where}; run the same command again to resume"
                                                + (f" from {Path(resume).name}" if resume else ""))
        bar.close()

    watch.done.set()
    if watch.words:  # hung: its processes were killed; reconcile restarts it from the newest checkpoint
        return child("Failed", failure="hang", message=watch.words, stopped=tuple(watch.stopped))
    said = outcome.decode(message_path.read_text(errors="replace")) if message_path.is_file() else None
    if code == 0 and said is not None and "error" not in said:
        return child("Succeeded", result=said)
    text = (out / "log.txt").read_text(errors="replace").splitlines()
    text = text[max(i for i, line in enumerate(text) if line.startswith("=== ")):]  # this attempt's
    if said is not None and "error" in said:
        # The trainer said what is wrong and what to fix: the summary prints it once (its traceback
        # stays in log.txt, for a bug report).
        return child("Failed", message=outcome.describe(said, code))
    view.show_tail(text, out / "log.txt")  # it died without a word (killed, a crash): its last lines
    why = ("exited 0 without writing its result (result.json and the outcome written with it): what it made "
           "and its metrics are unknown, so the stage failed" if code == 0 else view.last_words(text))
    return child("Failed", message=f"Error (exit code {code}): {why}")


class HangWatch:
    """The local hang clock: once a stage's training reported, no step, heartbeat or checkpoint line for its
    hang timeout (stages[].hangTimeoutSeconds, else health.hang_timeout) means hung; so does one of its
    processes stopped (state T: SIGSTOP, a debugger) that long while the others go on (rank 0, waiting between
    steps in a collective with the stopped rank, still prints heartbeats: health.rank_silent_for is the
    cluster's twin). Then it names the stage's stopped processes with their RANK, kills them all (SIGKILL),
    and the stage's child reports Failed, failure 'hang'."""

    look_every = 5.0  # seconds between looks at the processes' states (/proc)

    def __init__(self, run: AlignmentRun, index: int, live: LiveStatus, proc: subprocess.Popen):
        self.run, self.index, self.live, self.proc = run, index, live, proc
        self.done = threading.Event()
        self.words: str | None = None
        self.stopped: list[str] = []

    def watch(self) -> None:
        st = lambda: self.run.status.stages[self.index] if self.run.status else None  # noqa: E731
        stopped_since: dict[int, float] = {}  # pid -> when it was first seen stopped
        next_look = 0.0
        while not self.done.wait(1.0) and self.proc.poll() is None:
            if self.live.active is None or st() is None or health.finishing(st()):
                continue
            now = time.monotonic()
            if now >= next_look:
                next_look = now + self.look_every
                stopped_now = {pid for pid, state, _ in _descendants(self.proc.pid) if state in "Tt"}
                stopped_since = {pid: stopped_since.get(pid, now) for pid in stopped_now}
            waited = now - self.live.active
            quiet = now - min(stopped_since.values()) if stopped_since else 0.0
            timeout = health.hang_timeout(st(), self.run.spec.stages[self.index].hang_timeout_seconds)
            if waited < timeout and quiet < timeout:
                continue
            tree = _descendants(self.proc.pid)
            stopped = [f"rank {rank} (pid {pid})" for pid, state, rank in tree if state in "Tt"]
            halted = {rank for _, state, rank in tree if state in "Tt"}
            if waited >= timeout:
                words = health.hang_words(st(), waited, timeout, stopped)
            elif stopped:  # the stage still reports: a rank stopped
                still = sorted({rank for _, state, rank in tree if state not in "Tt"} - halted)
                words = health.hang_words(st(), quiet, timeout, stopped, still, from_ranks=True)
            else:  # it went on meanwhile (SIGCONT)
                stopped_since = {}
                continue
            self.stopped, self.words = stopped, words
            print(f"\n! stage {st().name}: {words}; stopping it", flush=True)
            for pid, _, _ in tree:
                try:
                    os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
                except ProcessLookupError:
                    pass
            return


def _descendants(root: int) -> list[tuple[int, str, str]]:
    """(pid, state, RANK) of a process and everything under it, from /proc (Linux)."""
    parent: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, rest = int(stat.parent.name), text[text.rindex(")") + 2:].split()
        states[pid] = rest[0]
        parent.setdefault(int(rest[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in states:
            try:
                env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            except OSError:
                env = {}
            found.append((pid, states[pid], env.get("RANK", "0")))
        todo += parent.get(pid, [])
    return found


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _follow(lines: queue.Queue, log, bar: view.ProgressBar, live: LiveStatus | None = None,
            stop: Stop | None = None) -> None:
    """Every line to log.txt; JSON event lines to status.json and the progress bar; returns at end of output."""
    while True:
        if stop is not None:
            stop.check()
        try:
            line = lines.get(timeout=0.5)  # short waits keep Ctrl-C responsive
        except queue.Empty:
            continue
        if line is None:
            return
        log.write(line)
        log.flush()
        event = view.parse_event(line)
        if live is not None:
            live.event(event)
            st = live.run.status.stages[live.index] if live.run.status else None
            bar.event(event, st.progress if st else None)
        else:
            bar.event(event)


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


def write_curves(run: AlignmentRun, run_dir: Path) -> Path | None:
    """curves.png of the whole run, drawn by the trainer's plotting tool (matplotlib lives there)."""
    out = run_dir / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer.plots", str(run_dir), str(out),
                           *(s.name for s in run.spec.stages)], capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        print(f"note: no curves.png ({(proc.stderr.strip().splitlines() or ['no metrics'])[-1]})")
        return None
    return out


# ---------------------------------------------------------------------------- the run

def read_run(file: str, overrides: list[str] = (), strict_paths: bool = True) -> AlignmentRun:
    """The run file with its --set overrides, validated as the API server would, and the local
    paths it names checked (RunInvalid: each problem with its field, value and fix)."""
    docs = run_documents(file)
    if len(docs) != 1:
        raise RunInvalid([f"expected one AlignmentRun document, found {len(docs)}"], file)
    doc = docs[0]
    shown = apply_overrides(doc, list(overrides))
    run = parse_run(doc, f"{file} with --set {', '.join(shown)}" if shown else file, local=True)
    problems = path_problems(run, strict=strict_paths) + hub_token_problems(run)
    if problems:
        raise RunInvalid(problems, file)
    for line in shown:
        print(f"- set {line}")
    return run


def hub_token_problems(run: AlignmentRun) -> list[str]:
    """spec.hub and promote.exports' hf:// locally: the push at the end needs a token where huggingface_hub
    looks for one (HF_TOKEN, else the token `hf auth login` stored), checked before any stage trains rather
    than after the last one."""
    exports = [x.uri for x in run.spec.promote.exports if x.uri.startswith("hf://")] if run.spec.promote else []
    if (run.spec.hub is None and not exports) or hf_token_found():
        return []
    none = ("needs a Hugging Face token with write access, and there is none: set HF_TOKEN or run `hf auth login` "
            "(on a cluster it comes from spec.trainer.hfTokenSecretRef)")
    return ([f"spec.hub: pushing to {run.spec.hub.repo_id} {none}"] if run.spec.hub else []) + (
        [f"spec.promote.exports: exporting to {', '.join(exports)} {none}"] if exports else [])


def hf_token_found() -> bool:
    """Whether the trainer's huggingface_hub.get_token() will find a token: HF_TOKEN (or the older
    HUGGING_FACE_HUB_TOKEN), else the file at HF_TOKEN_PATH, default $HF_HOME/token, HF_HOME defaulting to
    $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface (huggingface_hub.constants; the operator has no
    huggingface_hub)."""
    if os.environ.get("HF_TOKEN", "").strip() or os.environ.get("HUGGING_FACE_HUB_TOKEN", "").strip():
        return True
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    path = Path(os.path.expanduser(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")))
    return path.is_file() and bool(path.read_text(errors="replace").strip())


def run_local(file: str, workdir: str = "runs", overrides: list[str] = (), redo: list[str] = (),
              from_stage: str | None = None) -> int:
    """Exit 0 succeeded, 1 a stage failed, 2 fix the input (the run, a path, a request) or the run is
    in use by another run --local, 130 interrupted."""
    try:
        run = read_run(file, overrides)
    except RunInvalid as e:
        print(f"ERR {e}", file=sys.stderr)
        return 2
    root = os.path.abspath(workdir)
    run_dir = Path(stage_dir(root, run, "-")).parent
    try:
        with RunLock(run_dir):
            command = " ".join(["alignctl run --local", file, *([f"--workdir {workdir}"] if workdir != "runs" else []),
                                *(f"--set {shlex.quote(o)}" for o in overrides)])
            return _run(run, root, run_dir, command, list(redo), from_stage)
    except RunLocked as e:
        print(f"ERR {view.rel(run_dir)} is in use by another alignctl run --local ({e})", file=sys.stderr)
        return 2
    except PlanError as e:
        print(f"ERR {e}", file=sys.stderr)
        return 2


def local_slots(run: AlignmentRun) -> int:
    """How many stages run here side by side at most: the cores this process may use, each stage holding
    as many as its processes (spec.parallelism bounds it further, in reconcile)."""
    procs = max((s.resources.processes_per_node or 1) for s in run.spec.stages)
    return max(1, int(usable_cpus()) // procs)


def may_overlap(run: AlignmentRun) -> bool:
    """Whether two stages of the run can run at once: one read by several, or several reading nothing."""
    readers: dict[str, int] = {}
    roots = 0
    for i in range(len(run.spec.stages)):
        needs = inputs(run, i)
        roots += not needs
        for n in needs:
            readers[n] = readers.get(n, 0) + 1
    return roots > 1 or any(n > 1 for n in readers.values())


def _worker(done: queue.Queue, name: str, run: AlignmentRun, index: int, root: str, started: str, stop: Stop,
            share: int, tty: bool, on_start) -> None:
    try:
        ended = run_stage(run, index, root, started, stop=stop, share=share, tty=tty, on_start=on_start)
    except Exception as e:  # noqa: BLE001  (a bug here must end the stage, not hang the run)
        ended = ObservedChild(name, child_name(run, name), "Failed", 1, kind="process", created=started,
                              finished=now(), message=f"the local runner failed: {type(e).__name__}: {e}")
    done.put((name, ended))


def _next_done(done: queue.Queue) -> tuple[str, ObservedChild]:
    while True:
        try:
            return done.get(timeout=0.5)
        except queue.Empty:
            continue


def _stop_all(workers: dict, done: queue.Queue, observed: dict[str, ObservedChild], signum: int) -> None:
    """Stop every running stage (each forwards the signal to its process group and records where it
    stopped); asked again meanwhile: kill them."""
    for _, stop, _ in workers.values():
        stop.signum = signum
    while workers:
        try:
            name, ended = _next_done(done)
        except Interrupted:
            for _, _, pid in workers.values():
                for p in pid:
                    try:
                        os.killpg(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            continue
        workers.pop(name)[0].join()
        observed[name] = ended


def _run(run: AlignmentRun, root: str, run_dir: Path, command: str, redo: list[str], from_stage: str | None) -> int:
    run.status = read_status(run_dir)
    again = to_redo(run, root, redo, from_stage)
    plan.edited_finished(run, run.status, root, again, command)
    for path in plan.reset(run, run.status, root, again):
        print(f"- redo: removed {view.rel(path)}")
    if again:
        print(f"- redo: {', '.join(again)} run again from scratch")
        if run.status is not None:
            write_status(run_dir, run.status)
    run.metadata.annotations[RETRY_ANNOTATION] = f"local-{datetime.now(timezone.utc).isoformat()}"
    warn_missing_outputs(run, root)
    view.announce(run, run_dir)

    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    observed: dict[str, ObservedChild] = {}
    slots = local_slots(run)
    side_by_side = slots > 1 and may_overlap(run)
    workers: dict[str, tuple[threading.Thread, Stop, list]] = {}  # stage -> (thread, stop, [pid])
    done: queue.Queue = queue.Queue()  # (stage, ObservedChild) of each stage that ended
    try:
        while True:
            with STATUS_LOCK:
                result = reconcile(run, None, observed, now(), slots=slots)
                run.status = result.status
                write_status(run_dir, run.status)
            for action in result.actions:
                if isinstance(action, Event) and action.reason != "StageFailed":  # the summary says it, once
                    print(f"{'!' if action.type == 'Warning' else '-'} {view.clip(action.message)}", flush=True)
                elif isinstance(action, DeleteChild):
                    observed.pop(action.stage, None)
            starts = [a for a in result.actions if isinstance(a, CreateStage)]
            for start in starts:
                st = run.status.stages[start.index]
                # The spec the stage's attempt started with (an interrupted stage resumes under it, as on a cluster).
                attempt = attempt_run(run, run.status, start.index)
                stop, pid = Stop(), []
                share = len(workers) + len(starts) if side_by_side else 1
                thread = threading.Thread(target=_worker, daemon=True, args=(
                    done, st.name, attempt, start.index, root, st.start_time or now(), stop, share,
                    not side_by_side, pid.append))
                workers[st.name] = (thread, stop, pid)
                observed[st.name] = ObservedChild(st.name, child_name(run, st.name), "Running", 1, kind="process",
                                                  created=st.start_time or now())
                thread.start()
            if not workers and not any(isinstance(a, (DeleteChild, CreateStage)) for a in result.actions):
                break
            if not workers:
                continue  # a stale child was dropped: reconcile again
            name, ended = _next_done(done)  # short waits: Ctrl-C stays responsive
            workers.pop(name)[0].join()
            observed[name] = ended
            if ended.state == "Interrupted":  # stopped from outside (a signal to its process group)
                raise Interrupted(signal.SIGTERM)
    except Interrupted as e:
        _stop_all(workers, done, observed, e.signum)
        with STATUS_LOCK:
            run.status = reconcile(run, None, observed, now(), slots=slots).status
            write_status(run_dir, run.status)
        for st in run.status.stages:
            if st.message and st.message.startswith("interrupted"):
                print(f"stage {st.name}: {st.message}")
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if exports.export_promoted(run, run_dir):  # spec.promote.exports: the promoted model leaves the run
        run.status = reconcile(run, None, observed, now(), slots=slots).status
        write_status(run_dir, run.status)
    view.summary(run, run.status, run_dir, write_curves(run, run_dir))
    if run.status.comparison:
        plot = run_dir / "comparison.png"
        subprocess.run([sys.executable, "-m", "alignment_trainer.plots", "--compare", str(run_dir / "status.json"),
                        str(plot)], capture_output=True, text=True)
        if plot.is_file():
            print(f"comparison plot: {view.rel(plot)}")
    if any(c.type == "Exported" and c.status == "False" for c in run.status.conditions):
        return 1  # trained and promoted, but not where it had to go
    return 0 if run.status.phase == "Succeeded" else 1
