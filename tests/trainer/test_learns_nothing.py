"""A stage whose gradients are all zero learns nothing, and says so instead of ending Succeeded (issue 31).

At learning rate 1e4 one Adam step (about 1e4 per weight) saturates the tiny model into a constant
output: from then on every logging step logs loss ln(vocabulary) and grad_norm exactly 0, no weight
moves, and the stage used to exit 0 with a model that learned nothing. The LearningGuard counts those
steps like its other signals (guards.steps in a row): a `degraded/grad_norm` figure in the logs (the
operator's Degraded condition), and with guards.fatal the stage fails with NotLearning, exit 2.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer

SATURATING = {"max_steps": 6, "learning_rate": 1e4, "per_device_train_batch_size": 16, "max_length": 64,
              "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0}


def test_a_model_saturated_into_zero_gradients_is_degraded_and_fails_when_fatal(tmp_path, tiny_model, data_dir, kit,
                                                                                 monkeypatch):
    from alignment_trainer.__main__ import classify
    from alignment_trainer.live import Heartbeat, NotLearningError

    data = [str(data_dir / "sft.jsonl")]
    warn = kit.write_recipe(tmp_path / "warn", "sft", tiny_model, data, training=SATURATING, guards={"steps": 3},
                            tracking={"report_to": []})
    kit.run_in_process(warn)
    rows = [r for r in kit.metrics(tmp_path / "warn" / "out") if "grad_norm" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["grad_norm"] > 0, "the first step has a gradient"
    flat = [r["step"] for r in rows if r["grad_norm"] == 0]
    assert flat and flat == list(range(flat[0], 7)) and flat[0] <= 3, rows  # saturated: exactly 0 ever after
    said = [r["step"] for r in rows if "degraded/grad_norm" in r]
    assert said == list(range(flat[0] + 2, 7)), rows  # the third zero in a row says so, and every step after
    assert all(r["degraded/grad_norm"] == 0.0 for r in rows if "degraded/grad_norm" in r)
    assert (tmp_path / "warn" / "out" / "final").is_dir(), "not fatal by default: the stage ends"

    fatal = kit.write_recipe(tmp_path / "fatal", "sft", tiny_model, data, training=SATURATING,
                             guards={"steps": 3, "fatal": True}, tracking={"report_to": []})
    beats = []  # the fatal stage's heartbeat thread, as on_train_begin started it
    begin = Heartbeat.on_train_begin

    def recorded(self, *args, **kwargs):
        control = begin(self, *args, **kwargs)
        beats.append(self._thread)
        return control

    monkeypatch.setattr(Heartbeat, "on_train_begin", recorded)
    with pytest.raises(NotLearningError) as info:
        kit.run_in_process(fatal)
    # The stage raised before on_train_end: its heartbeat stopped anyway (a beating thread left behind
    # printed heartbeat lines into whatever ran next in the process; a CI run's `alignctl validate` output).
    assert beats and beats[0] is not None and not beats[0].is_alive(), beats
    failure = classify(info.value)
    assert (failure["reason"], failure["exit_code"]) == ("NotLearning", 2), failure
    assert f"training learns nothing at step {flat[0] + 2}: gradient norm 0 (at most 0) for 3 logging steps: " \
           "no weight moves" in failure["error"], failure
    assert not (tmp_path / "fatal" / "out" / "final").exists()
