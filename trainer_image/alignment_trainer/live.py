"""While a stage trains: push live progress, and stop it when the numbers stop being numbers.

ProgressPush speaks Kubeflow Trainer's status contract (the same as transformers'
KubeflowCallback): when KUBEFLOW_TRAINER_SERVER_URL is set it POSTs

    {"trainerStatus": {"progressPercentage", "estimatedRemainingSeconds",
                       "metrics": [{"name", "value"}], "lastUpdatedTime"}}

with the projected token in KUBEFLOW_TRAINER_SERVER_TOKEN, verifying the server with
KUBEFLOW_TRAINER_SERVER_CA_CERT, at most every 5 s, from the main process, from a background
thread (a slow server never stalls a step; a failed push is logged once, training goes on).
It reports more than the stock callback: the preference metrics of the last logging step and
tokens/s. ALIGNMENT_PROGRESS_CALLBACK=transformers keeps transformers' own callback instead.
Every process, whatever rank, also beats every HEARTBEAT_S from a thread of its own, inside a step too:
{"metrics": [{"name": "rank", "value": "<its global rank>"}], "lastUpdatedTime"} and nothing else. A stopped
process beats nothing, so when a stage hangs the operator names the rank(s) whose beats stopped.

DivergenceGuard raises DivergedError (reason Diverged, exit 2) at the first logging step whose
loss or gradient norm is NaN or inf, naming the step. transformers' logging_nan_inf_filter would
hide a NaN loss behind the running average, so the trainer turns it off (training.build_config).
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.request
from datetime import datetime, timezone

from transformers import TrainerCallback

from .pace import Pace
from .recipe import CHANCE_ACCURACY, GUARD_FIGURES, REWARD_FAILURES, REWARD_TIES, ZERO_GRAD_NORM

log = logging.getLogger("alignment_trainer")
URL_ENV, CA_ENV, TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_URL", "KUBEFLOW_TRAINER_SERVER_CA_CERT", "KUBEFLOW_TRAINER_SERVER_TOKEN"
CHOICE_ENV = "ALIGNMENT_PROGRESS_CALLBACK"  # "alignment" (default) or "transformers"
MIN_INTERVAL_S = 5.0
# Logged metrics worth pushing (the rest of a log row stays in metrics.jsonl).
PUSHED = ("loss", "grad_norm", "learning_rate", "rewards/margins", "rewards/accuracies", "rewards/chosen",
          "rewards/rejected", "kl", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
          *GUARD_FIGURES)


class DivergedError(Exception):
    """The loss or gradient norm is not finite: lowering the learning rate or fixing the data must come first."""


class DivergenceGuard(TrainerCallback):
    """Stop at the first logged non-finite loss or grad norm (before that step's checkpoint is saved:
    transformers logs, then saves)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Under fp16 an inf/NaN gradient is the loss scaler's overflow: that step is skipped and
        # the scale lowered, as designed. Only a non-finite loss means divergence there.
        watched = ("loss",) if args.fp16 else ("loss", "grad_norm")
        bad = {k: logs[k] for k in watched
               if isinstance((logs or {}).get(k), (int, float)) and not math.isfinite(logs[k])}
        if bad:
            said = ", ".join(f"{k} {v}" for k, v in bad.items())
            raise DivergedError(f"training diverged at step {state.global_step}/{state.max_steps}: {said} "
                                f"(learning rate {logs.get('learning_rate', args.learning_rate):g})")


class CheckpointClock(TrainerCallback):
    """The newest complete checkpoint (step, wall time) and the seconds trained since it: the work a
    preemption would lose. The checkpoint a run resumes from counts from the moment training resumed.
    Announces each save as a `checkpoint` line (the local runner reads it); fields() is what progress
    reports carry."""

    def __init__(self):
        self.step: int | None = None
        self.saved: float | None = None   # unix time the newest complete checkpoint was written
        self.since: float | None = None   # unix time from which training is at risk

    def on_train_begin(self, args, state, control, **kwargs):
        from .checkpoints import newest_checkpoint

        self.since = time.time()
        resumed = newest_checkpoint(args.output_dir)
        if resumed:
            done = os.path.join(resumed, "trainer_state.json")
            self.step, self.saved = int(resumed.rsplit("-", 1)[1]), os.path.getmtime(done)

    def on_save(self, args, state, control, **kwargs):
        # transformers calls on_save once the checkpoint is whole (trainer_state.json written last).
        self.step, self.saved = state.global_step, time.time()
        self.since = self.saved
        if state.is_world_process_zero:
            from .results import emit

            emit("checkpoint", step=self.step, path=os.path.join(args.output_dir, f"checkpoint-{self.step}"),
                 time=datetime.fromtimestamp(self.saved, timezone.utc).isoformat(), complete=True)

    def fields(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.since is not None:
            out["work_at_risk_seconds"] = round(time.time() - self.since, 1)
        if self.step is not None:
            # whole seconds: a push carries floats with 6 significant digits (1.76501e+09 is 10^4 s off)
            out.update(checkpoint_step=self.step, checkpoint_time=int(self.saved))
        return out


class NotLearningError(Exception):
    """Training learns nothing (LearningGuard) and the stage's guards make that fatal."""


# Samples a reward or judge could not score since the last logging step, per process: [failed, total].
REWARD_SAMPLES = [0, 0]


def note_reward_samples(failed: int, total: int) -> None:
    """A reward function scored `total` samples, `failed` of them not really (a judge that gave no grade)."""
    REWARD_SAMPLES[0] += failed
    REWARD_SAMPLES[1] += total


class LearningGuard(TrainerCallback):
    """Learning nothing, from the logged metrics of each training logging step:
    - GRPO groups whose rewards all tie (frac_reward_zero_std) above guards.reward_ties_fraction for
      guards.steps logging steps in a row: no advantage, no gradient;
    - a reward or judge failing on more than guards.reward_failure_fraction of the interval's samples;
    - preference accuracy on the training batches (rewards/accuracies) at or below guards.chance_accuracy
      for guards.steps logging steps in a row after warmup;
    - a gradient norm at or below guards.zero_grad_norm (default: exactly 0) for guards.steps logging steps in a
      row: no weight moves (a model saturated into a constant output logs loss and grad_norm 0 and would
      otherwise end Succeeded, having learned nothing).
    Each adds `degraded/<what>` with its figure to that step's logs (metrics.jsonl, progress lines, the
    push: the operator's Degraded condition), and, with guards.fatal, raises NotLearningError."""

    def __init__(self, guards):
        self.guards = guards
        self.ties = self.chance = self.flat = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not any(k in logs for k in ("loss", "grad_norm", "frac_reward_zero_std", "rewards/accuracies")):
            return
        g, said = self.guards, {}
        ties = logs.get("frac_reward_zero_std")
        if isinstance(ties, (int, float)):
            self.ties = self.ties + 1 if ties > g.reward_ties_fraction else 0
            if self.ties >= g.steps:
                said[REWARD_TIES] = float(ties)
        failed, total = REWARD_SAMPLES
        REWARD_SAMPLES[:] = [0, 0]
        if total and failed / total > g.reward_failure_fraction:
            said[REWARD_FAILURES] = round(failed / total, 4)
        accuracy = logs.get("rewards/accuracies")
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps else 0
        if isinstance(accuracy, (int, float)) and state.global_step > max(warmup, 1):
            self.chance = self.chance + 1 if accuracy <= g.chance_accuracy else 0
            if self.chance >= g.steps:
                said[CHANCE_ACCURACY] = float(accuracy)
        grad = logs.get("grad_norm")
        if isinstance(grad, (int, float)):
            self.flat = self.flat + 1 if grad <= g.zero_grad_norm else 0  # NaN/inf: the DivergenceGuard's
            if self.flat >= g.steps:
                said[ZERO_GRAD_NORM] = float(grad)
        logs.update(said)
        if said and g.fatal:
            raise NotLearningError(f"training learns nothing at step {state.global_step}: " + "; ".join(
                g.describe(k, v) for k, v in said.items()))


HEARTBEAT_S = 5.0  # between steps, one heartbeat this often


class Heartbeat(TrainerCallback):
    """Says the stage is alive while it is busy between optimizer steps (logging, evaluation, a checkpoint
    write, fetching the next batch): a `heartbeat` line every HEARTBEAT_S (the local runner reads it) and a
    progress push (the operator's hang clock). Inside a step nothing beats: a step that never ends (a rank
    stopped, a collective that never returns) is a hang. A stopped process beats nothing either. Main process."""

    def __init__(self, push: "ProgressPush | None" = None, interval: float = HEARTBEAT_S):
        self.push, self.interval = push, interval
        self.between = False
        self.state = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.state, self.between = state, True
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self.between = False

    def on_step_end(self, args, state, control, **kwargs):
        self.between = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """No more beats (training.train calls it too: a stage that raises never reaches on_train_end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        from .results import emit

        while not self._stop.wait(self.interval):
            if self.between and self.state is not None:
                emit("heartbeat", step=self.state.global_step)
                if self.push is not None:
                    self.push.beat(self.state)


def use_own_callback() -> bool:
    """Our callback pushes, unless there is nowhere to push or the stock one is asked for."""
    return bool(os.environ.get(URL_ENV)) and os.environ.get(CHOICE_ENV, "alignment") != "transformers"


class ProgressPush(TrainerCallback):
    """Pushes progress to the operator (see the module doc)."""

    def __init__(self, url: str | None = None, interval: float = MIN_INTERVAL_S, clock: CheckpointClock | None = None,
                 beat_interval: float = HEARTBEAT_S):
        self.url = url or os.environ[URL_ENV]
        self.clock = clock
        self.interval, self.beat_interval = interval, beat_interval
        self.metrics: dict[str, float] = {}
        self.started = self.start_step = None
        self.last_push = -math.inf
        self.pace: Pace | None = None  # from on_train_begin: eta, step_seconds, tokens_per_second
        self._pending: bytes | None = None
        self._wake = threading.Event()
        self._warned = False
        self._closing = False
        self._context = None
        self._thread: threading.Thread | None = None
        self.rank: int | None = None
        self._stop_beats = threading.Event()

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self.rank = args.process_index  # every process beats
        threading.Thread(target=self._beat_loop, name="rank-beat", daemon=True).start()
        if not state.is_world_process_zero:
            return
        self.started, self.start_step = time.monotonic(), state.global_step
        self.pace = Pace(state.global_step, state.num_input_tokens_seen or 0, now=self.started)
        self._thread = threading.Thread(target=self._send_loop, name="progress-push", daemon=True)
        self._thread.start()
        self._queue(state, force=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        for key in PUSHED:
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.metrics[key] = float(value)
        if self.pace is not None:
            self.metrics.update(self.pace.tokens(state.num_input_tokens_seen))
        if self.started is not None:
            self._queue(state)  # a logging step reports its own loss

    def on_step_end(self, args, state, control, **kwargs):
        # On a logging step transformers logs after this: report from on_log, with that step's loss.
        if state.is_world_process_zero and self.started is not None and not control.should_log:
            self._queue(state)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.started is not None:
            self._queue(state, force=True)  # the work at risk drops: say so now

    def beat(self, state) -> None:
        """Heartbeat: alive between steps (a report dated now, at most every interval)."""
        if self.started is not None and not self._closing:
            self._queue(state)

    def stop_beats(self) -> None:
        """This rank's alive beats end (training.train calls it too: a stage that raises never reaches
        on_train_end)."""
        self._stop_beats.set()

    def on_train_end(self, args, state, control, **kwargs):
        self.stop_beats()
        if not state.is_world_process_zero or self.started is None:
            return
        self._queue(state, force=True, done=True)
        self._closing = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)  # the last report (100%) goes out before the stage ends

    # ------------------------------------------------------------------ the report

    def body(self, state, done: bool = False) -> dict:
        step, total = state.global_step, state.max_steps or 0
        percent = 100 if done else min(99, int(100 * step / total)) if total else 0
        pace = self.pace.step(step, total) if self.pace is not None else {}
        eta = 0 if done else pace.get("eta_seconds")
        if "step_seconds" in pace:  # the operator derives the default hang timeout from it
            self.metrics["step_seconds"] = pace["step_seconds"]
        metrics = {**self.metrics, **(self.clock.fields() if self.clock else {}), "current_step": step,
                   "total_steps": total}
        if state.epoch is not None:
            metrics["current_epoch"] = round(state.epoch, 4)
        status = {"progressPercentage": percent, "lastUpdatedTime": datetime.now(timezone.utc).isoformat(),
                  "metrics": [{"name": k, "value": f"{v:.6g}" if isinstance(v, float) else str(v)}
                              for k, v in metrics.items()]}
        if eta is not None:
            status["estimatedRemainingSeconds"] = eta
        return {"trainerStatus": status}

    def beat_body(self) -> dict:
        """This process's alive beat: its rank, nothing else (it moves no progress)."""
        return {"trainerStatus": {"metrics": [{"name": "rank", "value": str(self.rank)}],
                                  "lastUpdatedTime": datetime.now(timezone.utc).isoformat()}}

    def _beat_loop(self) -> None:
        """Beats until training ends, whatever the process does meanwhile (a step, a collective, a save)."""
        while True:
            self._send(json.dumps(self.beat_body()).encode())
            if self._stop_beats.wait(self.beat_interval):
                return

    def _queue(self, state, force: bool = False, done: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_push < self.interval:
            return
        self.last_push = now
        self._pending = json.dumps(self.body(state, done)).encode()
        self._wake.set()

    def _send_loop(self) -> None:
        """Sends the newest report whenever there is one; ends after the last (on_train_end)."""
        while True:
            self._wake.wait()
            self._wake.clear()
            data, self._pending = self._pending, None
            if data is not None:
                self._send(data)
            if self._closing and self._pending is None:
                return

    def _send(self, data: bytes) -> None:
        try:
            token = open(os.environ[TOKEN_ENV]).read().strip() if os.environ.get(TOKEN_ENV) else ""
            request = urllib.request.Request(self.url, data=data, method="POST", headers={
                "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
            with urllib.request.urlopen(request, timeout=10, context=self._ssl()) as reply:
                reply.read()
        except Exception as e:  # noqa: BLE001 - progress is best effort; training goes on
            if not self._warned:
                detail = e.read().decode(errors="replace")[:300] if hasattr(e, "read") else ""
                log.warning("progress push to %s failed: %s %s (training goes on; further failures not logged)",
                            self.url, e, detail)
                self._warned = True

    def _ssl(self):
        if self._context is None:
            ca = os.environ.get(CA_ENV)
            self._context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        return self._context
