"""Losses the seed pipelines train with that TRL 1.x lacks, as subclasses of TRL's trainers.

    cdpo     the original DPO code's conservative DPO (eric-mitchell/direct-preference-optimization,
             trainers.preference_loss with label_smoothing; HALOs' CDPOTrainer): on summed log-probs,
             h = (log pi(yc) - log pi(yr)) - (log ref(yc) - log ref(yr)),
             loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).
             TRL's sigmoid ignores label_smoothing, so eps cannot be reached there.
    ipo_sum  that code's IPO (preference_loss with ipo=True): (h - 1 / (2 * beta))^2 on summed
             log-probs. TRL's (and HALOs') `ipo` divides each reply's log-ratio by its token count first.
    slic     HALOs' SLiC (SLiCTrainer; Zhao et al. 2023): no reference model,
             loss = max(0, beta - log pi(yc) + log pi(yr)) + lambda * (-log pi(yc)), summed log-probs,
             beta the margin (HALOs 1.0), lambda the weight of the chosen reply's NLL (HALOs 0.1).

cdpo and ipo_sum run TRL's DPOTrainer unchanged (its data, collator, reference handling, precomputed
log-probs and metrics) with the sigmoid loss standing in, read the sequence log-probs its forward
passes produced, and return their own loss in its place. slic overrides CPOTrainer.cpo_loss, the
loss hook TRL's reference-free trainer has.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import trl
from trl.experimental.cpo import CPOTrainer

from .refcache import CachedReference

# Our pairwise losses with a reference; TRL's DPOTrainer computes the log-probs with "sigmoid".
DPO_EXTENSIONS = ("cdpo", "ipo_sum")


def trl_loss_type(loss_type: str) -> str:
    """The loss_type to give TRL's DPOConfig for one of ours (or TRL's own unchanged)."""
    return "sigmoid" if loss_type in DPO_EXTENSIONS else loss_type


class DPOTrainer(CachedReference, trl.DPOTrainer):
    """trl.DPOTrainer that also trains `extended_loss` (one of DPO_EXTENSIONS), its precomputed
    reference log-probs kept in the shared cache (refcache.CachedReference)."""

    def __init__(self, *args, extended_loss: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if extended_loss is not None and extended_loss not in DPO_EXTENSIONS:
            raise ValueError(f"training.loss_type: {extended_loss!r} is not one of {', '.join(DPO_EXTENSIONS)}")
        self.extended_loss = extended_loss
        if extended_loss is not None:
            # What the sums below assume: one loss, plain summed log-ratios.
            unsupported = {"loss_type": self.loss_types != ["sigmoid"], "ld_alpha": self.ld_alpha is not None,
                           "use_weighting": self.use_weighting, "f_divergence_type": self.f_divergence_type != "reverse_kl"}
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(f"training.extra_args: {', '.join(bad)} cannot be combined with loss_type {extended_loss}")

    def _compute_loss(self, model, inputs, return_outputs):
        if self.extended_loss is None:
            return super()._compute_loss(model, inputs, return_outputs)
        policy, reference = self._scored_modules()
        with recording(policy) as policy_calls, recording(reference) as reference_calls:
            out = super()._compute_loss(model, inputs, return_outputs)  # TRL's passes and metrics
        width = inputs["completion_mask"].size(1) - 1
        chosen, rejected = policy_calls[0][:, -width:].sum(1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # the adapter-disabled policy (LoRA) is called second, a separate reference once
            ref_calls = policy_calls[1:] if reference is None else reference_calls
            ref_chosen, ref_rejected = ref_calls[0][:, -width:].sum(1).chunk(2)
        loss = extended_loss(self.extended_loss, chosen, rejected, ref_chosen, ref_rejected, self.beta,
                             self.label_smoothing).mean()
        return (loss, out[1]) if return_outputs else loss

    def _scored_modules(self):
        """The modules TRL put its fused log-prob head on: the policy (the base under LoRA), the reference."""
        from peft import PeftModel

        policy = self.accelerator.unwrap_model(self.model)
        if isinstance(policy, PeftModel):
            policy = policy.get_base_model()
        reference = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else None
        return policy, reference


@contextlib.contextmanager
def recording(module):
    """The per-token log-probs of each fused-head forward of `module` while inside, in call order.

    TRL replaced module.forward with its fused-head forward (an instance attribute); peft calls
    it directly (not through __call__, so forward hooks would miss it), so it is wrapped here.
    """
    calls: list = []
    if module is None:
        yield calls
        return
    fused = module.forward

    def forward(*args, **kwargs):
        out = fused(*args, **kwargs)
        if getattr(out, "log_probs", None) is not None:
            calls.append(out.log_probs)
        return out

    module.forward = forward
    try:
        yield calls
    finally:
        module.forward = fused


def extended_loss(name: str, chosen, rejected, ref_chosen, ref_rejected, beta: float, eps: float):
    """Per-pair loss of cdpo / ipo_sum from summed log-probs (the original DPO code's preference_loss)."""
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    if name == "cdpo":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if name == "ipo_sum":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"training.loss_type: {name!r} is not one of {', '.join(DPO_EXTENSIONS)}")


class SLiCTrainer(CPOTrainer):
    """HALOs' SLiC on CPOTrainer: its config's loss_type must be hinge (summed log-probs) and cpo_alpha 0
    (this loss carries its own regulariser, on the summed NLL of the chosen reply, as HALOs does)."""

    def __init__(self, *args, slic_lambda: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        if self.loss_type != "hinge" or self.cpo_alpha != 0:
            raise ValueError("slic: CPOConfig needs loss_type hinge and cpo_alpha 0")
        self.slic_lambda = slic_lambda

    def cpo_loss(self, policy_chosen_logps, policy_rejected_logps):
        calibration = torch.clamp(self.beta - policy_chosen_logps + policy_rejected_logps, min=0)
        losses = calibration + self.slic_lambda * -policy_chosen_logps
        return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()
