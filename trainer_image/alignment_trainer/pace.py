"""How fast a stage goes and how long it has left: the one place the trainer computes them.

Both reports of progress carry these figures, so the shells only display them: the progress events on
stdout (results.MetricsCallback, which `alignctl run --local` reads) and the push to the operator
(live.ProgressPush, estimatedRemainingSeconds and tokens_per_second). Standard library only.

    eta_seconds        the seconds left at the pace since training (re)started: a resumed stage's
                       steps before the restart do not count
    step_seconds       seconds per step over the same span (the operator derives the default hang
                       timeout from it)
    tokens_per_second  input tokens per second between the last two figures that saw tokens move
"""

from __future__ import annotations

import time


class Pace:
    def __init__(self, step: int = 0, tokens: float = 0, now: float | None = None):
        self.started = time.monotonic() if now is None else now
        self.start_step = step
        self.tokens_at = (self.started, tokens)

    def step(self, step: int, total: int, now: float | None = None) -> dict[str, float]:
        """eta_seconds and step_seconds at `step` of `total` (neither before the first step ran)."""
        now = time.monotonic() if now is None else now
        ran = step - self.start_step
        if ran <= 0:
            return {}
        per_step = (now - self.started) / ran
        out: dict[str, float] = {"step_seconds": round(per_step, 3)}
        if total:
            out["eta_seconds"] = int(per_step * (total - step))
        return out

    def tokens(self, seen: float | None, now: float | None = None) -> dict[str, float]:
        """tokens_per_second since the last call that saw the count grow (none before it has)."""
        now = time.monotonic() if now is None else now
        if not seen or seen <= self.tokens_at[1] or now <= self.tokens_at[0]:
            return {}
        rate = round((seen - self.tokens_at[1]) / (now - self.tokens_at[0]), 2)
        self.tokens_at = (now, seen)
        return {"tokens_per_second": rate}
