"""Live progress of a training stage: Kubeflow Trainer's push contract, read into our status.

Pure: no I/O, no clock (callers pass `now`). The endpoint (progress_server.py) serves

    POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status
    Authorization: Bearer <projected service-account token, audience audience(namespace, name)>
    {"trainerStatus": {"progressPercentage": 43, "estimatedRemainingSeconds": 7800,
                       "metrics": [{"name": "loss", "value": "0.61"}, ...],
                       "lastUpdatedTime": "2026-12-01T11:00:00+00:00"}}

the body of Kubeflow Trainer's TrainJob status endpoint (KEP-2779, trainer.kubeflow.org
v1alpha1), which transformers' KubeflowCallback sends whenever KUBEFLOW_TRAINER_SERVER_URL is
set. {name} is the stage's Job name, `<run>-<stage>-<hash>` (identity.child_name): one token
audience per stage, so a token minted for one stage moves no other. Metric names are the
callback's (current_step, total_steps, current_epoch, loss, grad_norm, learning_rate, ...)
plus the trainer's own (rewards/margins, rewards/accuracies, tokens_per_second).

Every process of a stage also beats, whatever it does (alignment_trainer.live.ProgressPush): a push whose
only metric is `rank` (its global rank). A beat goes into status.stages[].progress.ranks (rank -> when) and
moves neither the hang clock (lastUpdated) nor anything else, so a hang can name the rank(s) that stopped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from alignment_trainer.recipe import GUARD_FIGURES

from .api import StageProgress, StageStatus
from .bounded import Recent

API_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"
_PATH = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)"
                   r"/trainjobs/([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)/status$")
AUDIENCE_PREFIX = "progress.alignment.dev"
MAX_BODY_BYTES = 64 * 1024   # a real report is ~1 KiB; anything near this is not one
MAX_METRICS = 64
MAX_NAME, MAX_VALUE = 64, 64
MIN_WRITE_INTERVAL_S = 5.0   # at most one status write per stage this often
MAX_CLOCK_SKEW_S = 300       # a report dated further in the future is refused; a nearer one is read as now
MAX_STAGES = 4096            # stages the throttle remembers at once (the least recent is forgotten first)

# metric name(s) -> StageProgress field; the first name present wins.
FIELDS: dict[str, tuple[str, ...]] = {
    "step": ("current_step", "step"),
    "total_steps": ("total_steps",),
    "epoch": ("current_epoch", "epoch"),
    "loss": ("loss",),
    "grad_norm": ("grad_norm",),
    "learning_rate": ("learning_rate",),
    "reward_margin": ("rewards/margins",),
    "reward_accuracy": ("rewards/accuracies",),
    "tokens_per_second": ("tokens_per_second", "train_tokens_per_second"),
    "step_seconds": ("step_seconds",),
    "checkpoint_step": ("checkpoint_step",),
    "checkpoint_time": ("checkpoint_time",),
    "work_at_risk_seconds": ("work_at_risk_seconds",),
    **{key.replace("/", "_"): (key,) for key in GUARD_FIGURES},  # the guard's (StageProgress.degraded_*)
}
INTEGER_FIELDS = {"step", "total_steps", "checkpoint_step"}
RANK_METRIC = "rank"   # a beat: {"name": "rank", "value": "<the process's global rank>"}
MAX_RANKS = 4096       # ranks of one stage remembered
TIME_FIELDS = {"checkpoint_time"}  # unix seconds in a report, RFC 3339 in status


class Refused(Exception):
    """A report the endpoint turns away: `code` is the HTTP status, the message says why."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Report:
    """One parsed, validated push."""

    percent: int | None
    eta_seconds: int | None
    metrics: dict[str, float]
    sent: datetime


def audience(namespace: str, name: str) -> str:
    """The token audience of one stage: `progress.alignment.dev/<namespace>/<job name>`."""
    return f"{AUDIENCE_PREFIX}/{namespace}/{name}"


def status_path(namespace: str, name: str) -> str:
    return API_PATH.format(namespace=namespace, name=name)


def parse_path(path: str) -> tuple[str, str]:
    """(namespace, name) of a status URL path, or Refused(404)."""
    m = _PATH.match(path.split("?", 1)[0])
    if not m:
        raise Refused(404, f"not a progress endpoint: {path[:200]!r}; POST {API_PATH}")
    return m.group(1), m.group(3)


def _time(value: Any, where: str) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise Refused(400, f"{where}: expected an RFC 3339 time string, got {type(value).__name__}")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Refused(400, f"{where}: {value!r} is not an RFC 3339 time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _number(value: Any) -> float | None:
    """A metric value (the stock callback sends str(v)); None for what is not a finite number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def parse_report(raw: bytes, now: datetime) -> Report:
    """The body of a push, checked; Refused(400/413) names what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise Refused(413, f"body is {len(raw)} bytes; at most {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(400, f"body is not JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("trainerStatus"), dict):
        raise Refused(400, 'body: expected {"trainerStatus": {...}} (Kubeflow Trainer\'s status update)')
    unknown = set(body) - {"trainerStatus"}
    if unknown:
        raise Refused(400, f"body: unknown field(s) {sorted(unknown)[:5]}; only trainerStatus")
    ts = body["trainerStatus"]
    known = {"progressPercentage", "estimatedRemainingSeconds", "metrics", "lastUpdatedTime"}
    unknown = set(ts) - known
    if unknown:
        raise Refused(400, f"trainerStatus: unknown field(s) {sorted(unknown)[:5]}; accepted: {sorted(known)}")
    if "lastUpdatedTime" not in ts:
        raise Refused(400, "trainerStatus.lastUpdatedTime: required (RFC 3339)")
    sent = _time(ts["lastUpdatedTime"], "trainerStatus.lastUpdatedTime")
    if (sent - now).total_seconds() > MAX_CLOCK_SKEW_S:
        raise Refused(400, f"trainerStatus.lastUpdatedTime: {ts['lastUpdatedTime']} is in the future")
    percent = ts.get("progressPercentage")
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100):
        raise Refused(400, f"trainerStatus.progressPercentage: {percent!r}; expected an integer 0-100")
    eta = ts.get("estimatedRemainingSeconds")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, int) or eta < 0):
        raise Refused(400, f"trainerStatus.estimatedRemainingSeconds: {eta!r}; expected an integer >= 0")
    metrics: dict[str, float] = {}
    raw_metrics = ts.get("metrics") or []
    if not isinstance(raw_metrics, list) or len(raw_metrics) > MAX_METRICS:
        raise Refused(400, f"trainerStatus.metrics: expected a list of at most {MAX_METRICS} {{name, value}}")
    for i, m in enumerate(raw_metrics):
        if (not isinstance(m, dict) or set(m) != {"name", "value"} or not isinstance(m["name"], str)
                or not isinstance(m["value"], str) or len(m["name"]) > MAX_NAME or len(m["value"]) > MAX_VALUE):
            raise Refused(400, f"trainerStatus.metrics[{i}]: expected {{name: string <= {MAX_NAME}, "
                               f"value: string <= {MAX_VALUE}}}")
        number = _number(m["value"])
        if number is not None:
            metrics[m["name"]] = number
    return Report(percent=percent, eta_seconds=eta, metrics=metrics, sent=sent)


def beat_rank(report: Report) -> str | None:
    """The rank a push beats for (its `rank` metric: a whole number below MAX_RANKS), else None."""
    rank = report.metrics.get(RANK_METRIC)
    return str(int(rank)) if rank is not None and rank == int(rank) and 0 <= rank < MAX_RANKS else None


def only_a_beat(report: Report) -> bool:
    """A rank's beat and nothing else: no step, so no progress to report."""
    return beat_rank(report) is not None and not any(k in report.metrics for k in FIELDS["step"])


def newest_beats(*beats: dict[str, str]) -> dict[str, str]:
    """Per rank, the newest of the beat times given (RFC 3339); at most MAX_RANKS ranks."""
    out: dict[str, str] = {}
    for each in beats:
        for rank, when in (each or {}).items():
            if rank in out or len(out) < MAX_RANKS:
                if rank not in out or _time(when, "beat") > _time(out[rank], "beat"):
                    out[rank] = when
    return out


def stage_progress(report: Report, previous: StageProgress | None = None) -> StageProgress:
    """The status fields of a report. A metric the report lacks keeps its last value (the stock
    callback sends the loss only on logging steps, the step on every one)."""
    values: dict[str, Any] = previous.model_dump(exclude={"last_updated", "percent", "eta_seconds"}) if previous else {}
    for name, keys in FIELDS.items():
        found = next((report.metrics[k] for k in keys if k in report.metrics), None)
        if found is not None and name in TIME_FIELDS:
            values[name] = _rfc3339(datetime.fromtimestamp(found, timezone.utc)) if 0 <= found < 1e11 else None
        elif found is not None:
            values[name] = int(found) if name in INTEGER_FIELDS else float(f"{found:.7g}")  # bounded, relative
    percent = report.percent
    if percent == 100 and values.get("total_steps") and not any(k in report.metrics for k in FIELDS["step"]):
        values["step"] = values["total_steps"]  # the stock callback's last report: 100%, metrics without a step
    if percent is None and values.get("step") is not None and values.get("total_steps"):
        percent = min(100, int(100 * values["step"] / values["total_steps"]))
    if percent is None:
        percent = previous.percent if previous else 0
    return StageProgress(percent=percent, eta_seconds=report.eta_seconds, last_updated=rfc3339_ms(report.sent),
                         **values)


def completed(progress: StageProgress | None, steps: float | None = None) -> StageProgress | None:
    """A succeeded stage's progress: every step done, whatever its last report said (the trainer's final
    100% may reach no replica before the stage is marked Succeeded: a push then is refused, and a
    held-back one may be older). `steps`: the optimizer steps its result says it took."""
    if progress is None:
        return None
    step = int(steps) if steps is not None and steps >= 0 else progress.total_steps or progress.step
    return progress.model_copy(update={"percent": 100, "eta_seconds": 0, "step": step, "work_at_risk_seconds": 0.0})


def from_event(event: dict[str, Any], eta_seconds: int | None, sent: datetime,
               previous: StageProgress | None = None) -> StageProgress | None:
    """The same fields from a trainer progress line on stdout (the local shell reads these)."""
    step, total = event.get("step"), event.get("total")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return None
    metrics = {k: float(v) for k, v in event.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if "train_tokens_per_second" in metrics and "tokens_per_second" not in metrics:
        metrics.pop("train_tokens_per_second")  # the whole run's average, logged once at its end
    metrics.update(current_step=step, total_steps=total)
    return stage_progress(Report(percent=min(100, int(100 * step / total)), eta_seconds=eta_seconds,
                                 metrics=metrics, sent=sent), previous)


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_ms(t: datetime) -> str:
    """Milliseconds kept: the replay check compares against what status stores."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def eta_text(seconds: int | None) -> str:
    """7800 -> 2h10m, 95 -> 1m35s, 40 -> 40s."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def summary(stages: list[StageStatus], done: int) -> str:
    """The PROGRESS column: the running stage's live progress, else stages done out of all; with several
    running, stages done, how many run and the least advanced one's percent (`2/6, 3 running, dpo-0-1 40%`)."""
    several = [s for s in stages if s.phase == "Running"]
    if len(several) > 1:  # siblings side by side: how many, and the one furthest behind
        behind = min((s for s in several if s.progress is not None), key=lambda s: s.progress.percent, default=None)
        return f"{done}/{len(stages)}, {len(several)} running" + (
            f", {behind.name} {behind.progress.percent}%" if behind is not None else "")
    running = next((s for s in stages if s.phase == "Running"), None)
    if running is not None and running.progress is not None:
        p = running.progress
        return f"{running.name} {p.percent}%" + (f" ETA {eta_text(p.eta_seconds)}" if p.eta_seconds is not None
                                                 and p.percent < 100 else "")
    return f"{done}/{len(stages)}"


# ---------------------------------------------------------------------------- throttling

@dataclass
class _Slot:
    last_write: float = -math.inf    # monotonic time of the last status write
    last_sent: datetime | None = None  # lastUpdatedTime of the newest accepted report
    pending: Any = None              # the newest report not yet written


@dataclass
class Throttle:
    """At most one status write per stage every MIN_WRITE_INTERVAL_S; the newest report wins.

    `offer` says whether to write now; otherwise the report waits in the stage's slot and
    `due` says when to flush it. Replays (a report no newer than the newest accepted) are refused.
    At most MAX_STAGES slots: a forgotten stage's replay check falls back to the time its status
    stores, which `check_fresh` reads too.
    """

    interval: float = MIN_WRITE_INTERVAL_S
    slots: dict[tuple[str, str], _Slot] = field(default_factory=lambda: Recent(MAX_STAGES))

    def check_fresh(self, key: tuple[str, str], sent: datetime, stored: str | None) -> None:
        slot = self.slots.setdefault(key, _Slot())
        newest = slot.last_sent
        if stored is not None:
            stored_t = _time(stored, "status")
            newest = max(newest, stored_t) if newest else stored_t
        if newest is not None and sent <= newest:
            raise Refused(409, f"report of {_rfc3339(sent)} is not newer than the last accepted one "
                               f"({_rfc3339(newest)}): a replay or out of order")

    def offer(self, key: tuple[str, str], report: Any, sent: datetime, now: float) -> bool:
        """Accept a fresh report: True when it may be written now (the caller then calls `wrote`)."""
        slot = self.slots.setdefault(key, _Slot())
        slot.last_sent = sent
        if now - slot.last_write >= self.interval:
            slot.pending = None
            return True
        slot.pending = report
        return False

    def wrote(self, key: tuple[str, str], now: float) -> None:
        self.slots.setdefault(key, _Slot()).last_write = now

    def due(self, key: tuple[str, str]) -> float:
        """Monotonic time at which the stage's pending report may be written."""
        slot = self.slots.get(key)
        return (slot.last_write if slot else -math.inf) + self.interval

    def take(self, key: tuple[str, str]) -> Any:
        slot = self.slots.get(key)
        if slot is None:
            return None
        report, slot.pending = slot.pending, None
        return report

    def forget(self, key: tuple[str, str]) -> None:
        """The stage ended: nothing more of it to throttle."""
        self.slots.pop(key, None)
