"""While a stage trains: a diverging loss stops it (Diverged, exit 2, the step named, no final/),
and progress reaches an HTTPS endpoint in Kubeflow Trainer's shape from our callback or from
transformers' own KubeflowCallback, unchanged."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def test_a_diverging_sft_stops_with_diverged_and_the_step(tmp_path, tiny_model, data_dir, kit):
    recipe = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                              training={"max_steps": 40, "learning_rate": 1e30, "per_device_train_batch_size": 16,
                                        "max_length": 64, "logging_steps": 1, "save_steps": 1,
                                        "warmup_ratio": 0.0},
                              termination_message_path=str(tmp_path / "termination-log"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer", recipe], env=kit.trainer_env(),
                          capture_output=True, text=True, timeout=300, cwd=kit.repo)
    seconds = time.monotonic() - started
    message = json.loads((tmp_path / "termination-log").read_text())
    out = tmp_path / "out"
    rows = kit.metrics(out)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message["reason"] == "Diverged" and message["exit_code"] == 2
    bad = next(r for r in rows if not all(map(_finite, (r.get("loss", 0), r.get("grad_norm", 0)))))
    assert f"training diverged at step {bad['step']}/40" in message["error"], (message, rows[:5])
    assert bad["step"] < 40 and rows[-1]["step"] == bad["step"]  # it stopped at that step
    assert not (out / "final").exists()
    # The checkpoint of the diverged step is not written (transformers logs before it saves).
    assert not (out / f"checkpoint-{bad['step']}").exists()
    print(f"\ndiverged at step {bad['step']} ({bad}), exit 2 after {seconds:.1f}s")


def _finite(x) -> bool:
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------------------- pushes

class Sink:
    """An HTTPS server that records every POST (path, Authorization, JSON body)."""

    def __init__(self, directory: Path):
        import sys as _sys

        _sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))
        from alignment_operator.progress_server import self_signed

        cert, key, ca = self_signed(directory, ["127.0.0.1"])
        (directory / "ca.crt").write_text(ca)
        self.ca = directory / "ca.crt"
        self.posts: list[tuple[float, str, str, dict]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sink.posts.append((time.monotonic(), self.path, self.headers.get("Authorization"), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/tiny-dpo/status"

    def env(self, token_file: Path, **extra) -> dict:
        token_file.write_text("the-token\n")
        return {"KUBEFLOW_TRAINER_SERVER_URL": self.url, "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(self.ca),
                "KUBEFLOW_TRAINER_SERVER_TOKEN": str(token_file), **extra}


def _metrics(body: dict) -> dict:
    return {m["name"]: m["value"] for m in body["trainerStatus"].get("metrics", [])}


def _dpo(tmp_path, tiny_model, data_dir, kit, sink, **extra):
    recipe = kit.write_recipe(tmp_path, "dpo", tiny_model, [str(data_dir / "prefs.jsonl")],
                              training={"max_steps": 24, "learning_rate": 5e-4, "per_device_train_batch_size": 8,
                                        "max_length": 64, "logging_steps": 2, "save_steps": 100, "beta": 0.1},
                              termination_message_path=str(tmp_path / "termination-log"))
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer", recipe],
                          env=kit.trainer_env(sink.env(tmp_path / "token", **extra)),
                          capture_output=True, text=True, timeout=600, cwd=kit.repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return kit.metrics(tmp_path / "out")


def test_our_callback_pushes_progress_with_preference_metrics_and_tokens_per_second(
        tmp_path, tiny_model, data_dir, kit):
    sink = Sink(tmp_path / "tls")
    rows = _dpo(tmp_path, tiny_model, data_dir, kit, sink)
    assert all(p[1].endswith("/namespaces/ns/trainjobs/tiny-dpo/status") and p[2] == "Bearer the-token"
               for p in sink.posts)
    # Each rank's alive beat (its rank, no progress; its own thread, every 5 s) is not a progress report:
    # the throttle below is the reports'.
    beats = [p for p in sink.posts if "progressPercentage" not in p[3]["trainerStatus"]]
    assert beats and all(_metrics(p[3]) == {"rank": "0"} for p in beats), beats
    posts = [p for p in sink.posts if p not in beats]
    bodies = [p[3] for p in posts]

    assert len(posts) >= 2 and bodies[-1]["trainerStatus"]["progressPercentage"] == 100
    gaps = [b[0] - a[0] for a, b in zip(posts[1:-2], posts[2:-1])]  # between the begin and end pushes
    assert all(g >= 4.9 for g in gaps), gaps
    last = _metrics(bodies[-1])
    logged = [r for r in rows if "rewards/margins" in r]
    assert float(last["rewards/margins"]) == pytest.approx(logged[-1]["rewards/margins"], rel=1e-4)
    assert float(last["rewards/accuracies"]) == pytest.approx(logged[-1]["rewards/accuracies"], rel=1e-4)
    assert int(last["current_step"]) == 24 and int(last["total_steps"]) == 24
    assert any(float(_metrics(b).get("tokens_per_second", 0)) > 0 for b in bodies)
    # Only ours pushed: transformers' KubeflowCallback was taken off (its bodies lack our metrics).
    assert all("rewards/margins" in _metrics(b) or b["trainerStatus"]["progressPercentage"] == 0 for b in bodies)


def test_transformers_kubeflow_callback_is_used_unchanged_when_asked(tmp_path, tiny_model, data_dir, kit):
    sink = Sink(tmp_path / "tls")
    _dpo(tmp_path, tiny_model, data_dir, kit, sink, ALIGNMENT_PROGRESS_CALLBACK="transformers")
    bodies = [p[3] for p in sink.posts]

    assert bodies and bodies[0]["trainerStatus"]["progressPercentage"] == 0
    assert bodies[-1]["trainerStatus"]["progressPercentage"] == 100
    # The stock callback's shape: no tokens_per_second of ours, its own names (total_steps at the
    # start; current_step only on pushes its throttle lets through, none on a short fast run).
    assert all("tokens_per_second" not in _metrics(b) for b in bodies)
    assert "total_steps" in _metrics(bodies[0])


def test_under_fp16_an_overflowed_gradient_is_the_scalers_business_a_nan_loss_is_not():
    from types import SimpleNamespace

    from alignment_trainer.live import DivergedError, DivergenceGuard

    guard, state = DivergenceGuard(), SimpleNamespace(global_step=7, max_steps=10)
    fp16, bf16 = SimpleNamespace(fp16=True, learning_rate=1e-5), SimpleNamespace(fp16=False, learning_rate=1e-5)
    guard.on_log(fp16, state, None, logs={"loss": 1.2, "grad_norm": float("inf")})  # a skipped step
    for args, logs in ((fp16, {"loss": float("nan")}), (bf16, {"loss": 1.2, "grad_norm": float("nan")})):
        with pytest.raises(DivergedError, match="at step 7/10"):
            guard.on_log(args, state, None, logs=logs)


def test_the_learning_guard_counts_steps_in_a_row_and_fails_only_when_fatal():
    from types import SimpleNamespace

    from alignment_trainer.live import REWARD_SAMPLES, LearningGuard, NotLearningError, note_reward_samples
    from alignment_trainer.recipe import GuardArgs

    args = SimpleNamespace(get_warmup_steps=lambda total: 2)
    state = lambda step: SimpleNamespace(global_step=step, max_steps=20)  # noqa: E731
    guard = LearningGuard(GuardArgs(steps=2))
    rows = [{"loss": 0.7, "rewards/accuracies": a} for a in (0.0, 0.5, 0.5, 0.9, 0.5, 0.5)]
    for step, row in enumerate(rows, 1):
        guard.on_log(args, state(step), None, logs=row)
    # steps 1-2 are warmup; 3 is the first at chance, 4 learns, 5-6 are at chance again: 6 says so
    assert [r.get("degraded/preference_accuracy") for r in rows] == [None] * 5 + [0.5]
    REWARD_SAMPLES[:] = [0, 0]
    note_reward_samples(3, 8)  # a judge that gave no grade for 3 of 8 answers
    row = {"loss": 0.1}
    fatal = LearningGuard(GuardArgs(fatal=True))
    with pytest.raises(NotLearningError, match=r"step 7: the reward failed on 38% of samples \(more than 20%\)"):
        fatal.on_log(args, state(7), None, logs=row)
    assert row["degraded/reward_failures"] == 0.375 and REWARD_SAMPLES == [0, 0]


def test_a_push_carries_the_checkpoints_time_to_the_second():
    """A push formats floats with 6 significant digits: a unix time as a float would be hours off."""
    import time as clock
    from types import SimpleNamespace

    from alignment_trainer.live import CheckpointClock, ProgressPush

    saved = CheckpointClock()
    saved.on_save(SimpleNamespace(output_dir="/tmp/x"), SimpleNamespace(global_step=5, is_world_process_zero=False),
                  None)
    push = ProgressPush(url="https://operator.invalid/status", clock=saved)
    push.started, push.start_step = clock.monotonic(), 0
    body = push.body(SimpleNamespace(global_step=6, max_steps=20, epoch=None))
    sent = {m["name"]: m["value"] for m in body["trainerStatus"]["metrics"]}
    assert sent["checkpoint_step"] == "5" and abs(float(sent["checkpoint_time"]) - clock.time()) < 5, sent


def test_the_heartbeat_beats_between_steps_only(capfd):
    """Logging, evaluation, a checkpoint write, the next batch (between on_step_end and on_step_begin) beat; the
    step itself does not: a step that never ends is the hang the operator restarts."""
    import time as clock
    from types import SimpleNamespace

    from alignment_trainer.live import Heartbeat

    beats = []
    push = SimpleNamespace(beat=lambda state: beats.append(state.global_step))
    heart = Heartbeat(push, interval=0.05)
    state = SimpleNamespace(is_world_process_zero=True, global_step=4)
    heart.on_train_begin(None, state, None)
    clock.sleep(0.3)
    assert beats, "before the first step: alive"
    heart.on_step_begin(None, state, None)
    clock.sleep(0.1)
    during = len(beats)
    clock.sleep(0.3)
    assert len(beats) == during, "inside a step nothing beats"
    state.global_step = 5
    heart.on_step_end(None, state, None)  # then the checkpoint write, however slow
    clock.sleep(0.3)
    heart.on_train_end(None, state, None)
    assert beats[-1] == 5 and len(beats) > during
    assert '{"event": "heartbeat", "step": 5}' in capfd.readouterr().out


RANK_PROCESS = """
import datetime, os, signal, sys, time
from types import SimpleNamespace
import torch, torch.distributed as dist
from alignment_trainer.live import ProgressPush

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=4))
push = ProgressPush(beat_interval=0.2)
push.on_train_begin(SimpleNamespace(process_index=rank), SimpleNamespace(is_world_process_zero=False), None)
time.sleep(1)
if rank == 1:
    print("stopping", time.time(), flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen, as a SIGSTOP from the node freezes it
print("collective", time.time(), flush=True)
try:
    dist.all_reduce(torch.zeros(1))  # rank 1 never joins: blocks until the group's timeout
except Exception:
    pass
print("returned", time.time(), flush=True)
push.on_train_end(None, SimpleNamespace(is_world_process_zero=False), None)
"""


def test_every_rank_beats_inside_a_collective_and_a_stopped_one_does_not(tmp_path, kit):
    """Issue 31: each process beats {rank} from a thread of its own. Rank 0 blocked in a gloo all_reduce that
    never completes still beats (the collective lets go of the GIL); rank 1, SIGSTOPped, beats nothing: the
    operator names rank 1 and only rank 1."""
    import socket
    from datetime import datetime

    sink = Sink(tmp_path / "tls")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = kit.trainer_env(sink.env(tmp_path / "token"))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_PROCESS, str(r), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out0, err0 = procs[0].communicate(timeout=300)  # two processes importing torch and transformers
        assert procs[0].returncode == 0, err0[-2000:]
        said = dict(line.split() for line in out0.splitlines() if line.split()[0] in ("collective", "returned"))
        start, end = float(said["collective"]), float(said["returned"])
    finally:
        procs[1].kill()
        procs[1].communicate()
    beats = [(_metrics(b)["rank"], datetime.fromisoformat(b["trainerStatus"]["lastUpdatedTime"]).timestamp())
             for _, _, _, b in sink.posts]
    assert all(set(_metrics(b)) == {"rank"} for _, _, _, b in sink.posts)  # a beat carries nothing else
    assert end - start >= 3, (start, end)  # it did block, until the group's timeout
    inside = [t for r, t in beats if r == "0" and start + 0.5 < t < end - 0.5]
    assert len(inside) >= 5, beats  # rank 0 beat all along inside the collective
    ones = [t for r, t in beats if r == "1"]
    assert ones and max(ones) < start + 0.5, beats  # rank 1 beat, then stopped with its process


def test_a_slow_healthy_phase_is_no_hang_and_a_step_that_never_ends_is(tmp_path, monkeypatch, kit):
    """Issue 31, with the trainer's own callbacks (Heartbeat and ProgressPush beating every 0.1 s, pushing over
    HTTPS) and the operator's own reading of the pushes and reconcile, hangTimeoutSeconds 1: 1.5 s before the first
    report (the reference log-prob precompute: TRL runs it in the trainer's constructor, before training begins)
    and a 1.5 s checkpoint write between steps are not restarted; a step that does not end for 1.5 s is, and the
    restart says every rank still beats (a collective that never returns, not a stopped process)."""
    import time as clock
    from datetime import datetime, timezone
    from types import SimpleNamespace

    import yaml

    sys.path.insert(0, str(kit.repo / "operator"))
    from alignment_operator.api import parse_run
    from alignment_operator.progress import beat_rank, newest_beats, only_a_beat, parse_report, rfc3339_ms, stage_progress
    from alignment_operator.reconcile import ObservedChild, reconcile
    from alignment_trainer.live import Heartbeat, ProgressPush

    sink = Sink(tmp_path / "tls")
    for name, value in sink.env(tmp_path / "token").items():
        monkeypatch.setenv(name, value)
    doc = yaml.safe_load((kit.repo / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="u1", generation=1)
    doc["spec"]["stages"][0]["hangTimeoutSeconds"] = 1
    now = lambda: datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")  # noqa: E731
    started = reconcile(parse_run(doc), 1, {}, now()).status  # sft starts: its attempt's clock

    def decide():
        """What the operator decides now, from every push so far (the endpoint's reading, unthrottled)."""
        progress, beats = None, {}
        for *_, body in sink.posts:
            report = parse_report(json.dumps(body).encode(), datetime.now(timezone.utc))
            if beat_rank(report) is not None:
                beats = newest_beats(beats, {beat_rank(report): rfc3339_ms(report.sent)})
            if not only_a_beat(report):
                progress = stage_progress(report, progress)
        status = started.model_copy(deep=True)
        if progress is not None:
            status.stages[0].progress = progress.model_copy(update={"ranks": beats})
        doc["status"] = status.wire()
        sft = status.stages[0]
        return reconcile(parse_run(doc), 1, {"sft": ObservedChild("sft", sft.job_name, "Running", 1, group=True)},
                         now()).status.stages[0]

    push = ProgressPush(interval=0.1, beat_interval=0.1)
    heart = Heartbeat(push, interval=0.1)
    args, control = SimpleNamespace(process_index=0), SimpleNamespace(should_log=False)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=10, num_input_tokens_seen=0, epoch=0.0)
    clock.sleep(1.5)  # the reference precompute, before training begins: nothing reported yet
    assert sink.posts == [] and decide().phase == "Running"
    for callback in (push, heart):
        callback.on_train_begin(args, state, control)
    for callback in (push, heart):
        callback.on_step_begin(args, state, control)
    state.global_step = 1
    for callback in (push, heart):
        callback.on_step_end(args, state, control)
    clock.sleep(1.5)  # a checkpoint write (evaluation, the next batch) between steps
    writing = decide()
    assert (writing.phase, writing.reason, writing.restarts) == ("Running", None, 0), writing.message
    for callback in (push, heart):
        callback.on_step_begin(args, state, control)
    clock.sleep(1.5)  # a step that does not end
    hung = decide()
    for callback in (push, heart):
        callback.on_train_end(args, state, control)
    assert (hung.phase, hung.reason, hung.restarts) == ("Pending", "Hang", 1), hung.message
    assert "at step 1/10; every rank still beats (0): stuck inside a step" in hung.message
