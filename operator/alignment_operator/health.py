"""Health of a running stage, from what its progress says (issue 31). Pure: no I/O, no clock.

- The newest complete checkpoint and the work at risk: the trainer reports the step and time of its
  newest complete checkpoint and the seconds trained since (alignment_trainer.live.CheckpointClock);
  `note_checkpoint` turns that into status.stages[].latestCheckpoint {step, path, time, complete}.
- What a disruption or a restart cost: the steps trained past that checkpoint (`lost_work`).
- Learning nothing: the trainer's LearningGuard reports `degraded/<what>` figures with its progress;
  `warnings` words them (the stage's warnings, the run's Degraded condition, a Warning Event).
"""

from __future__ import annotations

import posixpath

from alignment_trainer.recipe import GuardArgs

from .api.status import CheckpointRef, StageProgress, StageStatus

DEGRADED = {"degraded_reward_ties": "degraded/reward_ties", "degraded_reward_failures": "degraded/reward_failures",
            "degraded_preference_accuracy": "degraded/preference_accuracy"}  # StageProgress field -> trainer's key


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
    base = p.checkpoint_step or 0
    steps = max(0, p.step - base)
    where = f"checkpoint-{base}" if p.checkpoint_step is not None else "the start"
    seconds = f", {p.work_at_risk_seconds:.0f}s of training" if p.work_at_risk_seconds is not None else ""
    return steps, f"cost {steps} step(s){seconds}: step {p.step} back to {where}"


def warnings(progress: StageProgress | None, guards: GuardArgs | None) -> list[str]:
    """What the stage's last progress says it fails to learn, each with its figure."""
    if progress is None:
        return []
    return [(guards or GuardArgs()).describe(key, value) for field, key in DEGRADED.items()
            if (value := getattr(progress, field)) is not None]
