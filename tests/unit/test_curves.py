"""curves.png draws what the kept model went through: a resumed attempt replaces the steps the
stopped attempt logged after the checkpoint it resumed from."""

from __future__ import annotations

import json

from alignment_trainer.plots import read_metrics


def test_a_resumed_attempt_replaces_the_stopped_attempts_later_steps(tmp_path):
    first = [{"step": s, "total": 40, "loss": 2.0 - s / 100} for s in (5, 10, 15, 20, 25)]  # killed after 25
    resumed = [{"step": s, "total": 40, "loss": 1.0 - s / 100} for s in (25, 30, 35, 40)]   # from checkpoint-20
    summary = [{"step": 40, "total": 40, "train_runtime": 12.5}, {"step": 40, "total": 40, "eval_loss": 0.7}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in first + resumed + summary) + '{"step": 4')

    rows = read_metrics(path)
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["loss"] for r in rows if r["step"] == 25] == [0.75], "the stopped attempt's step 25 is gone"
    assert rows[-2:] == summary, "rows of one step (end-of-training summary, eval) all stay"
