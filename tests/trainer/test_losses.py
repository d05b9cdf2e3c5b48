"""Each loss a stage trains with equals its reference formula, computed here by hand.

The stage's trainer is built the way the stage builds it (dpo.build / kto.build), the policy is
moved off the reference (so the log-ratios are not all zero), and one batch from the trainer's own
data loader goes through the trainer's compute_loss. The sequence log-probs its forward passes
produced are recorded, and the formula of the paper / original code, written out here, is applied
to them: |diff| < 1e-6. Those log-probs are also checked against a plain forward pass computed
here (log_softmax of the logits over the completion tokens only, float64; |diff| < 1e-4), so
they are the ones the formulas mean.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignment_trainer.recipe import Recipe

TOL = 1e-6  # relative to the loss where it exceeds 1: the stage computes in float32, whose spacing
# at 11 (ipo_sum's summed log-ratios, squared) is 9.5e-7, while the formula is evaluated in float64


def close(stage_loss: float, expected: float) -> bool:
    return abs(stage_loss - expected) < TOL * max(1.0, abs(expected))


def recipe(tmp_path, tiny_model, data_dir, method, loss_type=None, **training):
    data = "kto.jsonl" if method == "kto" else "prefs.jsonl"
    return Recipe.model_validate({
        "method": method, "model": {"model_name_or_path": tiny_model, "torch_dtype": "float32"},
        "datasets": [{"path": str(data_dir / data)}], "output_dir": str(tmp_path / "out"),
        "training": {"per_device_train_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
                     "gradient_checkpointing": False, "loss_type": loss_type, **training}})


def build(r, perturb="model"):
    """The stage's trainer and a batch, one of its models (`perturb`) moved off the other."""
    from alignment_trainer.stages import dpo, kto

    torch.manual_seed(0)
    trainer, _ = (kto if r.method == "kto" else dpo).build(r)
    with torch.no_grad():
        for p in getattr(trainer, perturb).parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


@torch.no_grad()
def seq_logps(model, input_ids, attention_mask, scored):
    """Sum and count of log p(token) over the tokens `scored` marks (a plain forward, float64)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = scored[:, 1:].double()
    return (lp * mask).sum(-1), mask.sum(-1)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def dpo_pairs(trainer, batch):
    """The stage's loss, and per pair (policy chosen, policy rejected, ref chosen, ref rejected, chosen
    tokens, rejected tokens) as its forward passes computed them (checked against a plain forward)."""
    from alignment_trainer.losses import recording

    with recording(trainer.model) as policy, recording(trainer.ref_model) as reference:
        loss = trainer.compute_loss(trainer.model, batch).item()
    width = batch["input_ids"].size(1) - 1
    pol, ref = policy[0][:, -width:].sum(1).tolist(), reference[0][:, -width:].sum(1).tolist()
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    hand_pol, n = seq_logps(trainer.model, ids, att, comp)
    hand_ref, _ = seq_logps(trainer.ref_model, ids, att, comp)
    assert max(abs(a - b) for a, b in zip(pol + ref, hand_pol.tolist() + hand_ref.tolist())) < 1e-4
    b = ids.shape[0] // 2
    n = comp.sum(1).tolist()  # completion tokens per reply (TRL's length normalisation)
    return loss, [(pol[i], pol[b + i], ref[i], ref[b + i], n[i], n[b + i]) for i in range(b)]


def by_hand(name, pairs, beta, eps=0.0):
    losses = []
    for pc, pr, rc, rr, nc, nr in pairs:
        h = (pc - pr) - (rc - rr)
        if name == "sigmoid":  # DPO, Rafailov et al. eq. 7
            losses.append(-logsig(beta * h))
        elif name == "cdpo":  # the original DPO code's preference_loss with label_smoothing
            losses.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
        elif name == "ipo_sum":  # the original DPO code's ipo=True, summed log-probs
            losses.append((h - 1 / (2 * beta)) ** 2)
        elif name == "ipo":  # TRL / HALOs: each log-ratio averaged over its reply's tokens
            losses.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("method,loss_type,extra", [
    ("dpo", "sigmoid", {}),
    ("dpo", "cdpo", {"label_smoothing": 0.2}),
    ("ipo", "ipo", {}),
    ("ipo", "ipo_sum", {}),
])
def test_dpo_family_losses_equal_their_formulas(tmp_path, tiny_model, data_dir, method, loss_type, extra):
    r = recipe(tmp_path, tiny_model, data_dir, method, loss_type, beta=0.5, **extra)
    trainer, batch = build(r)
    stage_loss, pairs = dpo_pairs(trainer, batch)
    expected = by_hand(loss_type, pairs, 0.5, extra.get("label_smoothing", 0.0))
    assert close(stage_loss, expected), (stage_loss, expected)
    assert abs(expected - math.log(2)) > 1e-3, "the policy is off the reference: the test can tell losses apart"


def test_cdpo_differs_from_sigmoid_and_ipo_sum_from_ipo(tmp_path, tiny_model, data_dir):
    """The new losses are not TRL's under another name: on the same batch they give other values."""
    r = recipe(tmp_path, tiny_model, data_dir, "dpo", "cdpo", beta=0.5, label_smoothing=0.2)
    trainer, batch = build(r)
    _, pairs = dpo_pairs(trainer, batch)
    assert abs(by_hand("cdpo", pairs, 0.5, 0.2) - by_hand("sigmoid", pairs, 0.5)) > 1e-3
    assert abs(by_hand("ipo_sum", pairs, 0.5) - by_hand("ipo", pairs, 0.5)) > 1e-3


def cpo_pairs(trainer, batch):
    """The stage's loss, and per pair (chosen, rejected) log-probs as CPOTrainer's forward computed them
    (summed for slic, per-token averaged for simpo), checked against a plain forward."""
    forward, seen = trainer.concatenated_forward, []

    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((out[0].tolist(), out[1].tolist()))
        return out

    trainer.concatenated_forward = recorded
    loss = trainer.compute_loss(trainer.model, batch).item()
    chosen, rejected = seen[0]
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        labels = batch[f"{side}_labels"]
        s, n = seq_logps(trainer.model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], labels != -100)
        hand = (s / n if trainer.loss_type == "simpo" else s).tolist()
        assert max(abs(a - b) for a, b in zip(got, hand)) < 1e-4
    return loss, list(zip(chosen, rejected))


def test_simpo_loss_equals_its_formula(tmp_path, tiny_model, data_dir):
    r = recipe(tmp_path, tiny_model, data_dir, "simpo", beta=2.0)
    trainer, batch = build(r)
    gamma = trainer.simpo_gamma
    stage_loss, pairs = cpo_pairs(trainer, batch)
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma),
    # the pairs' log-probs already averaged over their tokens
    per_pair = [-logsig(2.0 * c - 2.0 * rj - gamma) for c, rj in pairs]
    expected = sum(per_pair) / len(per_pair)
    assert close(stage_loss, expected), (stage_loss, expected)


def test_slic_loss_equals_halos_formula(tmp_path, tiny_model, data_dir):
    r = recipe(tmp_path, tiny_model, data_dir, "slic", beta=1.0, slic_lambda=0.1)
    trainer, batch = build(r)
    assert getattr(trainer, "ref_model", None) is None, "SLiC has no reference model"
    trainer.model.double()  # the summed NLL makes this loss ~60: float32 rounds it at ~4e-6
    stage_loss, pairs = cpo_pairs(trainer, batch)
    # HALOs SLiCTrainer: max(0, beta - log pi(yc) + log pi(yr)) + lambda * -log pi(yc), summed log-probs
    per_pair = [max(0.0, 1.0 - c + rj) + 0.1 * -c for c, rj in pairs]
    expected = sum(per_pair) / len(per_pair)
    assert close(stage_loss, expected), (stage_loss, expected)
    assert any(1.0 - c + rj > 0 for c, rj in pairs), "the hinge is active on this batch"


def test_kto_loss_equals_its_formula(tmp_path, tiny_model, data_dir):
    r = recipe(tmp_path, tiny_model, data_dir, "kto", beta=0.5)
    trainer, batch = build(r, perturb="ref_model")  # a noisier reference: the KL estimate is above 0
    from alignment_trainer.losses import recording

    with recording(trainer.model) as policy, recording(trainer.ref_model) as reference:
        stage_loss = trainer.compute_loss(trainer.model, batch).item()
    # Each model scores the mismatched KL pairs first, then the completions.
    (pol_kl, pol), (ref_kl, ref) = ([c[:, -(batch[k].size(1) - 1):].sum(1) for c, k in
                                     zip(calls, ("KL_input_ids", "input_ids"))] for calls in (policy, reference))
    hand, _ = seq_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    hand_kl, _ = seq_logps(trainer.model, batch["KL_input_ids"], batch["KL_attention_mask"],
                           batch["KL_completion_mask"])
    assert (hand - pol.double()).abs().max() < 1e-4 and (hand_kl - pol_kl.double()).abs().max() < 1e-4
    # KTO (Ethayarajh et al. 2024, eq. 7; HALOs KTOTrainer): z0 = max(0, mean KL(mismatched pairs)),
    # desirable 1 - sigmoid(beta (r - z0)), undesirable 1 - sigmoid(beta (z0 - r)), r = log pi - log ref
    z0 = max(0.0, (pol_kl - ref_kl).mean().item())
    assert z0 > 0, "the KL term is active on this batch"
    labels = [bool(x) for x in batch["label"]]
    assert any(labels) and not all(labels), "the batch holds both labels"
    r_ = (pol - ref).tolist()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    chosen = [1 - sig(0.5 * (r_[i] - z0)) for i, lab in enumerate(labels) if lab]
    rejected = [1 - sig(0.5 * (z0 - r_[i])) for i, lab in enumerate(labels) if not lab]
    expected = sum(chosen + rejected) / len(labels)
    assert close(stage_loss, expected), (stage_loss, expected)
