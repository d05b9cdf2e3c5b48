"""ETA, seconds per step and tokens/s: the trainer computes them once (alignment_trainer.pace) and puts them
in its progress events and its push; `run --local` shows the trainer's figures, as a cluster does."""

from __future__ import annotations

import json

from alignment_trainer.pace import Pace

from test_reconcile import make_run, sft_running


def test_the_pace_counts_from_the_restart_and_tokens_between_figures():
    pace = Pace(step=10, tokens=1000, now=100.0)  # resumed at step 10: earlier steps do not count
    assert pace.step(10, 110, now=101.0) == {}, "no step ran yet: no estimate"
    assert pace.step(20, 110, now=120.0) == {"step_seconds": 2.0, "eta_seconds": 180}
    assert pace.tokens(5000, now=120.0) == {"tokens_per_second": 200.0}
    assert pace.tokens(5000, now=130.0) == {}, "no token moved since the last figure"
    assert pace.tokens(8000, now=135.0) == {"tokens_per_second": 200.0}


def test_the_local_status_shows_the_trainers_eta_and_tokens_per_second(tmp_path):
    from alignment_operator.local.runner import LiveStatus

    run = make_run()
    live = LiveStatus(make_run(status=sft_running(run)), 0, tmp_path)
    live.event({"event": "progress", "step": 5, "total": 50, "loss": 1.5, "num_input_tokens_seen": 640,
                "eta_seconds": 4321, "step_seconds": 96.02, "tokens_per_second": 123.45})
    progress = json.loads((tmp_path / "status.json").read_text())["stages"][0]["progress"]
    assert progress["etaSeconds"] == 4321 and progress["percent"] == 10
    assert progress["tokensPerSecond"] == 123.45 and progress["stepSeconds"] == 96.02
    live.event({"event": "progress", "step": 50, "total": 50, "loss": 1.4})  # a line without the pace
    progress = json.loads((tmp_path / "status.json").read_text())["stages"][0]["progress"]
    assert progress["step"] == 50 and "etaSeconds" not in progress, "the shell estimates nothing itself"


def test_the_progress_bar_shows_the_trainers_pace_for_an_evaluation_task(capsys):
    from alignment_operator.local.view import ProgressBar

    bar = ProgressBar("eval", tty=False)
    bar.event({"event": "progress", "step": 8, "total": 8, "task": "generations (model)", "eta_seconds": 0,
               "step_seconds": 0.25})
    bar.event({"event": "progress", "step": 3, "total": 3, "task": "judge"})  # a line without the pace
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("  eval generations (model)") and "8/8" in first
    assert "left 0s" in first and first.endswith("4.00 it/s")
    assert "judge" in second and "3/3" in second and "left" not in second and "it/s" not in second
