"""Health of a running stage, from what its progress says (issue 31). Pure: no I/O, no clock.

- The newest complete checkpoint and the work at risk: the trainer reports the step and time of its
  newest complete checkpoint and the seconds trained since (alignment_trainer.live.CheckpointClock);
  `note_checkpoint` turns that into status.stages[].latestCheckpoint {step, path, time, complete}.
- What a disruption or a restart cost: the steps and seconds trained past that checkpoint (`lost_work`,
  `charge_lost_work`: status.stages[].lostSteps, lostSeconds, lastDisruption).
- Hangs: no progress report and no heartbeat for the stage's hang timeout once its attempt reported
  (`silent_for`, `hang_timeout`), or one rank's alive beats stopped that long while the others go on
  (`rank_silent_for`); reconcile restarts it as a group from its newest checkpoint, naming the rank(s)
  whose alive beats stopped (`stopped_ranks`: every process beats, inside a step too).
- Learning nothing: the trainer's LearningGuard reports `degraded/<what>` figures with its progress;
  `warnings` words them (the stage's warnings, the run's Degraded condition, a Warning Event).
"""

from __future__ import annotations

import posixpath
from datetime import datetime

from alignment_trainer.recipe import GUARD_FIGURES, GuardArgs

from .api.status import CheckpointRef, StageProgress, StageStatus

DEGRADED = {key.replace("/", "_"): key for key in GUARD_FIGURES}  # StageProgress field -> the trainer's key


def note_checkpoint(st: StageStatus, stage_dir: str) -> None:
    """status.stages[].latestCheckpoint from the stage's last progress report, when it names a newer
    checkpoint than the one recorded (the local shell records the trainer's own path first)."""
    p = st.progress
    if p is None or p.checkpoint_step is None:
        return
    if st.latest_checkpoint is not None and st.latest_checkpoint.step == p.checkpoint_step:
        return
    st.latest_checkpoint = CheckpointRef(step=p.checkpoint_step, time=p.checkpoint_time, complete=True,
                                         path=posixpath.join(stage_dir, f"checkpoint-{p.checkpoint_step}"))


def lost_work(st: StageStatus) -> tuple[int, str]:
    """(steps, words) a stop of the stage now costs: the steps its last report had trained past the newest
    complete checkpoint (all of them without one), and the seconds of training that were."""
    p = st.progress
    if p is None or p.step is None:
        return 0, "no progress reported yet"
    saved = [s for s in (p.checkpoint_step, st.latest_checkpoint.step if st.latest_checkpoint else None)
             if s is not None and s <= p.step]
    base = max(saved, default=0)
    steps = p.step - base
    where = f"checkpoint-{base}" if saved else "the start"
    seconds = f", {p.work_at_risk_seconds:.0f}s of training" if p.work_at_risk_seconds is not None else ""
    return steps, f"cost {steps} step(s){seconds}: step {p.step} back to {where}"


def charge_lost_work(st: StageStatus) -> str:
    """A stop of the stage now (a disruption, a restart): its lost steps and seconds added to
    status.stages[].lostSteps and lostSeconds; the words that say what it cost."""
    steps, words = lost_work(st)
    st.lost_steps += steps
    if st.progress is not None and st.progress.work_at_risk_seconds is not None and steps:
        st.lost_seconds = round(st.lost_seconds + st.progress.work_at_risk_seconds, 1)
    return words


def warnings(progress: StageProgress | None, guards: GuardArgs | None) -> list[str]:
    """What the stage's last progress says it fails to learn, each with its figure."""
    if progress is None:
        return []
    return [(guards or GuardArgs()).describe(key, value) for field, key in DEGRADED.items()
            if (value := getattr(progress, field)) is not None]


# ---------------------------------------------------------------------------- hangs

HANG_FLOOR_S = 300        # the default hang timeout is never shorter than this
HANG_STEPS = 10           # ... nor than this many of the stage's measured steps


def hang_timeout(st: StageStatus, own: int | None) -> int:
    """stages[].hangTimeoutSeconds, else HANG_STEPS of the stage's measured step time, at least HANG_FLOOR_S."""
    if own is not None:
        return own
    step = st.progress.step_seconds if st.progress is not None and st.progress.step_seconds else 0.0
    return max(HANG_FLOOR_S, int(HANG_STEPS * step + 0.5))


def finishing(st: StageStatus) -> bool:
    """The stage reported its last step: what is left (final evaluation, final/ written, the push to the Hub)
    reports nothing more, and is no hang."""
    p = st.progress
    return p is not None and bool(p.total_steps) and p.step is not None and p.step >= p.total_steps


def silent_for(st: StageStatus, now: datetime) -> float | None:
    """Seconds since the stage's current attempt last reported progress or a heartbeat; None before its first
    report (loading, reference precompute: nothing to compare yet) or when the report is an earlier attempt's."""
    p = st.progress
    if p is None or not st.start_time or finishing(st):
        return None
    try:
        last, started = _ts(p.last_updated), _ts(st.start_time)
        return None if last < started else (now - last).total_seconds()
    except (ValueError, TypeError):  # not a time (or one without its zone): nothing to measure from
        return None


RANK_STALE_S = 15  # a rank beats every 5 s and status gets a beat within 5 s more: this long without one, it stopped


def _beats(st: StageStatus) -> tuple[datetime, list[tuple[int, datetime]]] | None:
    """(the current attempt's start, every rank's last alive beat, by rank), None when there is nothing to read
    (no beat yet, no start) or what status holds is no time."""
    p = st.progress
    if p is None or not p.ranks or not st.start_time:
        return None
    try:
        return _ts(st.start_time), sorted((int(r), _ts(t)) for r, t in p.ranks.items())
    except (ValueError, TypeError):
        return None


def rank_silent_for(st: StageStatus, now: datetime) -> float | None:
    """Seconds since the quietest rank of the current attempt last beat; None before any rank of it beat (a
    rank loading its model beats nothing yet) or once the stage reported its last step (ranks stop beating at
    the end of training, while rank 0 may still write final/). A rank's beats come from a thread of their own,
    inside a step, a collective or a save too: only a process that stopped (SIGSTOP, a lost node) or died
    goes quiet. The stage's own clock (`silent_for`) can keep moving meanwhile: rank 0, blocked between steps
    in a collective with the stopped rank (transformers gathers the next batch's token count before
    on_step_begin), still sends its between-steps heartbeat reports."""
    read = None if finishing(st) else _beats(st)
    if read is None:
        return None
    started, beats = read
    this_attempt = [t for _, t in beats if t >= started]
    return (now - min(this_attempt)).total_seconds() if this_attempt else None


def stopped_ranks(st: StageStatus, now: datetime, timeout: int) -> tuple[list[str], list[str]]:
    """(stopped, beating): the ranks of the current attempt whose alive beats (progress.ranks) stopped
    RANK_STALE_S (or the hang timeout, when shorter) ago, each with how long, and those still beating.
    A beat from before the attempt started is none of this attempt's."""
    read = _beats(st)
    if read is None:
        return [], []
    (started, beats), stale, stopped, beating = read, min(RANK_STALE_S, timeout), [], []
    for rank, last in beats:
        age = (now - last).total_seconds()
        if last < started:
            stopped.append(f"rank {rank} (no beat this attempt)")
        elif age >= stale:
            stopped.append(f"rank {rank} (no beat for {age:.0f}s)")
        else:
            beating.append(str(rank))
    return stopped, beating


def hang_words(st: StageStatus, waited: float, timeout: int, ranks: list[str], beating: list[str] = (),
               from_ranks: bool = False) -> str:
    """`from_ranks`: the stage kept reporting (its other ranks, `beating`) while `ranks` went quiet."""
    p = st.progress
    at = f"step {p.step}/{p.total_steps}" if p is not None and p.step is not None else "its last report"
    if from_ranks:
        quiet = ", ".join(r.split(" (", 1)[0] for r in ranks)
        return (f"Hang: no progress or heartbeat from {quiet} for {waited:.0f}s (hangTimeoutSeconds {timeout}) at "
                f"{at}, while {', '.join(f'rank {r}' for r in beating) or 'the stage'} still reported; "
                f"stopped: {', '.join(ranks)}")
    if ranks:
        who = f"; stopped: {', '.join(ranks)}"
    elif beating:  # every process lives: a step (a collective) that does not end
        who = f"; every rank still beats ({', '.join(beating)}): stuck inside a step"
    else:
        who = "; which rank stopped is not known"
    return (f"Hang: no progress or heartbeat for {waited:.0f}s (hangTimeoutSeconds {timeout}) at {at}{who}")


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))
