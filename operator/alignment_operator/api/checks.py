"""Cross-field checks, in Python, for `alignctl validate` and the operator.

The same rules are CEL `x-kubernetes-validations` on the models in spec.py, so the API server
refuses what these refuse; tests/manifests/bad/ holds manifests both must reject. Field-level
checks (types, ranges, enums, unknown fields) come from pydantic and the schema.
"""

from __future__ import annotations

from alignment_trainer.recipe import METHODS, loss_type_problem, training_methods

from . import admission
from .spec import AlignmentRunSpec, StageSpec


def _stage_problems(i: int, stage: StageSpec, earlier: list[str], reward_stages: list[str] = ()) -> list[str]:
    at = f"spec.stages[{i}]"
    out = []
    if stage.name in earlier:
        out.append(f"{at}.name: {stage.name!r} is already the name of stage "
                   f"{earlier.index(stage.name)}; stage names must be unique")
    if stage.from_ is not None and stage.from_ not in earlier:
        accepted = ", ".join(dict.fromkeys(earlier)) or "none (the first stage starts from spec.model)"
        out.append(f"{at}.from: {stage.from_!r} is not an earlier stage; accepted: {accepted}")
    if METHODS[stage.method].trains and not stage.datasets:
        out.append(f"{at}.datasets: method {stage.method!r} needs at least one dataset")
    if stage.test_datasets and stage.test_split_size is not None:
        out.append(f"{at}.testSplitSize: give testDatasets or testSplitSize, not both")
    size = stage.test_split_size
    if size is not None and size >= 1 and size != int(size):
        out.append(f"{at}.testSplitSize: {size} must be a fraction below 1 or a whole number of rows")
    t = stage.training
    if t.max_prompt_length is not None and t.max_prompt_length >= t.max_length:
        out.append(f"{at}.training.maxPromptLength: {t.max_prompt_length} must be below "
                   f"training.maxLength ({t.max_length})")
    problem = loss_type_problem(stage.method, t.loss_type)
    if problem:
        out.append(f"{at}.training.lossType: {problem}")
    if t.loss_type == "cdpo" and not t.label_smoothing > 0:
        out.append(f"{at}.training.labelSmoothing: {t.label_smoothing} with lossType cdpo; cdpo needs epsilon, "
                   "the fraction of flipped labels, with 0 < epsilon < 0.5 (e.g. 0.1)")
    if stage.lora and stage.lora.quantization != "none" and stage.resources.gpus_per_node == 0:
        out.append(f"{at}.lora.quantization: {stage.lora.quantization!r} needs GPUs "
                   f"(resources.gpusPerNode > 0); use 'none' on CPU")
    if stage.method == "grpo" and stage.grpo is None:
        out.append(f"{at}.grpo: method grpo needs a grpo section with rewards")
    for k, r in enumerate(stage.grpo.rewards if stage.grpo else []):
        if r.kind in ("regex", "format"):
            import re
            try:
                re.compile(r.pattern or "")
            except re.error as e:
                out.append(f"{at}.grpo.rewards[{k}].pattern: {r.pattern!r} is not a Python regex: {e}")
            if not r.pattern:
                out.append(f"{at}.grpo.rewards[{k}].pattern: a {r.kind} reward needs a pattern (a Python regex)")
        if r.kind == "reward_model" and r.reward_model not in reward_stages:
            out.append(f"{at}.grpo.rewards[{k}].rewardModel: {r.reward_model!r} is not an earlier reward stage; "
                       f"accepted: {', '.join(reward_stages) or 'none (add a stage with method reward)'}")
    if stage.eval is not None:
        if "judge" in stage.eval.metrics and stage.eval.judge is None:
            out.append(f"{at}.eval.judge: eval.metrics includes judge but no judge is configured")
        rm = stage.eval.reward_model
        rewards = list(reward_stages)
        if rm is not None and rm not in rewards:
            out.append(f"{at}.eval.rewardModel: {rm!r} is not an earlier reward stage; accepted: "
                       f"{', '.join(rewards) or 'none (add a stage with method reward)'}")
        graded = [name for name, section in (("alpacaEval", stage.eval.alpaca_eval), ("mtBench", stage.eval.mt_bench))
                  if section is not None]
        if graded and stage.eval.judge is None:
            out.append(f"{at}.eval.judge: eval.{' and eval.'.join(graded)} need an LLM judge; set eval.judge")
        ref = stage.eval.reference
        if ref is not None and ref not in earlier:
            out.append(f"{at}.eval.reference: {ref!r} is not an earlier stage; accepted: {', '.join(earlier) or 'none'}")
    return out


def cross_field_problems(spec: AlignmentRunSpec) -> list[str]:
    problems: list[str] = []
    earlier: list[str] = []
    for i, stage in enumerate(spec.stages):
        problems += _stage_problems(i, stage, earlier, [s.name for s in spec.stages[:i] if s.method == "reward"])
        earlier.append(stage.name)
    if not any(METHODS[s.method].trains for s in spec.stages):
        methods = ", ".join(s.method for s in spec.stages)
        problems.append(f"spec.stages: at least one training stage ({', '.join(training_methods())}) is required; "
                        f"got {methods}")
    st = spec.storage
    if (st.claim_name is None) == (st.volume_claim_template is None):
        problems.append("spec.storage: set exactly one of claimName or volumeClaimTemplate")
    return problems + admission.problems(spec)
