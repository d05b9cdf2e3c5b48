"""A stage whose gradients are all zero learns nothing, and says so instead of ending Succeeded (issue 31).

The tiny model with its (tied) embeddings all zero, as a checkpoint conversion that lost them leaves it:
every hidden state is 0, the logits are 0 (loss ln(vocabulary)), and every gradient is exactly 0 (each is
a product with a zero activation or with the zero embedding matrix), so no weight ever moves, and the
stage used to exit 0 with a model that learned nothing. The LearningGuard counts those steps like its
other signals (guards.steps in a row): a `degraded/grad_norm` figure in the logs (the operator's Degraded
condition), and with guards.fatal the stage fails with NotLearning, exit 2.

(It was a learning rate of 1e4 saturating the model in one step: chaotic at that scale, one CI run got a
NaN gradient at step 2 instead, and the divergence guard stopped the stage first.)
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.trainer

DEAD = {"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_length": 64,
        "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0}


def dead_model(tiny_model: str, where) -> str:
    """The tiny model saved again with its embeddings (tied to the output layer) set to zero."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.tie_word_embeddings, "zero gradients everywhere need the output layer zero too"
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    model.save_pretrained(where)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(where)
    return str(where)


def test_a_model_with_zero_gradients_is_degraded_and_fails_when_fatal(tmp_path, tiny_model, data_dir, kit,
                                                                         monkeypatch):
    from transformers import AutoTokenizer

    from alignment_trainer.__main__ import classify
    from alignment_trainer.live import Heartbeat, NotLearningError

    data, model = [str(data_dir / "sft.jsonl")], dead_model(tiny_model, tmp_path / "dead")
    warn = kit.write_recipe(tmp_path / "warn", "sft", model, data, training=DEAD, guards={"steps": 3},
                            tracking={"report_to": []})
    kit.run_in_process(warn)
    rows = [r for r in kit.metrics(tmp_path / "warn" / "out") if "grad_norm" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] == 0 for r in rows), rows  # exactly 0 at every step
    vocabulary = len(AutoTokenizer.from_pretrained(model))
    assert all(r["loss"] == pytest.approx(math.log(vocabulary), rel=1e-4) for r in rows), (rows, vocabulary)
    said = [r["step"] for r in rows if "degraded/grad_norm" in r]
    assert said == [3, 4, 5, 6], rows  # the third zero in a row says so, and every step after
    assert all(r["degraded/grad_norm"] == 0.0 for r in rows if "degraded/grad_norm" in r)
    assert (tmp_path / "warn" / "out" / "final").is_dir(), "not fatal by default: the stage ends"

    fatal = kit.write_recipe(tmp_path / "fatal", "sft", model, data, training=DEAD,
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
    assert "training learns nothing at step 3: gradient norm 0 (at most 0) for 3 logging steps: " \
           "no weight moves" in failure["error"], failure
    assert not (tmp_path / "fatal" / "out" / "final").exists()
