"""The method table: per method, the data it reads, whether it has a reference model, its losses and default,
its default learning rate and beta, and its stage entry; and what follows from it (the methods' names, what a
stage writes and reads, the descriptions that list them, which losses read label_smoothing).

Part of the trainer's torch-free contract (re-exported by recipe.py): the operator's API, CEL rules,
validation and render defaults read it, as do the trainer's data normalisation and dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DataKind = Literal["chat", "pairwise", "unpaired", "prompts", "completions"]


@dataclass(frozen=True)
class MethodInfo:
    """One row of the method table: everything the operator and the trainer need to know about
    a method. The API's enum and CEL rules, `alignctl validate`, the rendered defaults, data
    normalisation and the trainer's dispatch all read this table; adding a method is one row
    here and one stage entry under alignment_trainer/stages/."""

    data: DataKind              # what its datasets hold once normalised (data.normalise)
    reference: bool             # scores against a frozen reference model (or its precomputed log-probs)
    loss_types: tuple[str, ...]  # TRL loss_type values it accepts; the first is its default
    learning_rate: float        # default peak learning rate, full fine-tuning
    beta: float | None          # default beta (None: the method has no beta)
    entry: str                  # module under alignment_trainer.stages with run(recipe) -> result
    trains: bool = True         # False: it evaluates or makes data, and writes no model
    writes: str | None = None   # a data stage: the dataset file it leaves in final/ (datasets[].stage reads it)
    policy: bool = True         # False: final/ is no policy (a reward model); stages never start from it by default
    lora_learning_rate: float | None = None  # default peak learning rate under LoRA/QLoRA (None: learning_rate)

    @property
    def default_loss_type(self) -> str | None:
        return self.loss_types[0] if self.loss_types else None

    def default_learning_rate(self, lora: bool) -> float:
        """The learning rate a stage that sets none trains with: an adapter's own under LoRA/QLoRA."""
        return self.lora_learning_rate if lora and self.lora_learning_rate is not None else self.learning_rate

    @property
    def preference(self) -> bool:
        """Trains on preference feedback (pairs or labelled completions)."""
        return self.trains and self.data in ("pairwise", "unpaired")


# TRL 1.16's loss_type values (DPOConfig, KTOConfig, experimental CPOConfig for SimPO); the trainer
# checks them again against the TRL it runs. Learning rates: alignment-handbook's zephyr recipes
# (sft 2e-5, dpo 5e-7), the ORPO and SimPO papers' settings. An adapter (LoRA/QLoRA) trains at 10x
# its method's full fine-tuning rate: the handbook's zephyr QLoRA recipes (sft 2e-4, dpo 5e-6) and
# TRL 1.16's sft/dpo scripts' LoRA commands use exactly that ratio; TRL's kto script calls KTO's best
# settings "similar to DPO's", and the other methods keep the same ratio.
# Beyond TRL (losses.py, on TRL's DPOTrainer): cdpo, the original DPO code's conservative loss
# (label_smoothing epsilon), and ipo_sum, that code's IPO on summed log-probs (TRL's ipo is per-token
# averaged). slic is HALOs' SLiC on TRL's CPOTrainer (no reference model).
_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "cdpo", "ipo_sum")
METHODS: dict[str, MethodInfo] = {
    "sft": MethodInfo(data="chat", reference=False, loss_types=(), learning_rate=2e-5, beta=None, entry="sft",
                      lora_learning_rate=2e-4),
    "dpo": MethodInfo(data="pairwise", reference=True, loss_types=_DPO_LOSSES, learning_rate=5e-7, beta=0.1,
                      entry="dpo", lora_learning_rate=5e-6),
    "ipo": MethodInfo(data="pairwise", reference=True, loss_types=("ipo", "ipo_sum"), learning_rate=5e-7, beta=0.1,
                      entry="dpo", lora_learning_rate=5e-6),
    "kto": MethodInfo(data="unpaired", reference=True, loss_types=("kto", "apo_zero_unpaired"),
                      learning_rate=5e-7, beta=0.1, entry="kto", lora_learning_rate=5e-6),
    "orpo": MethodInfo(data="pairwise", reference=False, loss_types=(), learning_rate=5e-6, beta=0.1,
                       entry="dpo", lora_learning_rate=5e-5),
    "simpo": MethodInfo(data="pairwise", reference=False, loss_types=("simpo",), learning_rate=1e-6, beta=2.0,
                        entry="dpo", lora_learning_rate=1e-5),
    # HALOs' SLiC (config/loss/slic.yaml): beta is the hinge margin (1.0), lr HALOs' 5e-6.
    "slic": MethodInfo(data="pairwise", reference=False, loss_types=("slic",), learning_rate=5e-6, beta=1.0,
                       entry="dpo", lora_learning_rate=5e-5),
    # A Bradley-Terry reward model (TRL's RewardTrainer); final/ is a sequence-classification model.
    "reward": MethodInfo(data="pairwise", reference=False, loss_types=(), learning_rate=1e-5, beta=None,
                         entry="reward", policy=False),
    "eval": MethodInfo(data="pairwise", reference=True, loss_types=(), learning_rate=1e-6, beta=0.1,
                       entry="eval", trains=False),
    # Online RL on TRL's GRPOTrainer: prompts (+ an optional reference-answer column), rewards from
    # rule functions or a reward stage (recipe.grpo). loss_types: TRL 1.16's GRPOConfig, its default
    # (dapo) first; beta 0.04 is DeepSeekMath's GRPO KL coefficient (TRL's own default 0.0 loads no
    # reference; TrainingArgs.beta must be > 0), lr 1e-6 TRL's GRPO default.
    "grpo": MethodInfo(data="prompts", reference=False, loss_types=("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"),
                       learning_rate=1e-6, beta=0.04, entry="grpo", lora_learning_rate=1e-5),
    # Online rounds as HALOs runs them (sample -> label -> an offline method): generate samples
    # recipe.generate.num_generations completions per prompt from the stage's model; label scores
    # a generate stage's completions (recipe.label.rewards: grpo's rules or a reward stage) and
    # writes pairs (best vs worst) or binary feedback for dpo/kto/... They train nothing (their
    # learning rate is never used).
    "generate": MethodInfo(data="prompts", reference=False, loss_types=(), learning_rate=1e-6, beta=None,
                           entry="generate", trains=False, writes="generations.jsonl"),
    "label": MethodInfo(data="completions", reference=False, loss_types=(), learning_rate=1e-6, beta=None,
                        entry="label", trains=False, writes="feedback.jsonl"),
}


def method_names() -> list[str]:
    return list(METHODS)


def training_methods() -> list[str]:
    return [m for m, info in METHODS.items() if info.trains]


def preference_methods() -> list[str]:
    return [m for m, info in METHODS.items() if info.preference]


def data_methods() -> list[str]:
    """Methods whose stage writes a dataset (METHODS[m].writes) that later stages may read."""
    return [m for m, info in METHODS.items() if info.writes]


def output_kind(method: str, feedback: str | None = None) -> str | None:
    """What a data stage's dataset holds: completions (generate: prompts with sampled completions),
    pairwise (label, feedback pairwise: prompt/chosen/rejected) or unpaired (label, feedback binary:
    prompt/completion/label); None for a stage that writes no dataset."""
    if method == "generate":
        return "completions"
    if method == "label":
        return "unpaired" if feedback == "binary" else "pairwise"
    return None


def reads_outputs(method: str) -> tuple[str, ...]:
    """The kinds of stage output (output_kind) a method's datasets may name: label reads completions;
    pairwise methods and eval read pairs; kto and sft read pairs or binary feedback (data.py unpairs
    pairs, and SFT trains on the chosen / desirable replies); prompt methods read none."""
    return {"completions": ("completions",), "pairwise": ("pairwise",), "unpaired": ("pairwise", "unpaired"),
            "chat": ("pairwise", "unpaired"), "prompts": ()}[METHODS[method].data]


def check_method(value: str) -> str:
    """A field validator: the method must be a row of METHODS (read at call time)."""
    if value not in METHODS:
        raise ValueError(f"{value!r} is not a method; accepted: {', '.join(METHODS)}")
    return value


def _method_enum(schema: dict) -> None:
    schema["enum"] = method_names()


def grouped(pairs) -> str:
    """'a, b: X; c: Y' from (method, text) pairs, methods with the same text joined."""
    groups: dict[str, list[str]] = {}
    for method, text in pairs:
        groups.setdefault(text, []).append(method)
    return "; ".join(f"{', '.join(ms)}: {text}" for text, ms in groups.items())


def all_loss_types() -> list[str]:
    """Every loss_type of the method table (the schema's enum; which method takes which is a CEL rule)."""
    return sorted({lt for info in METHODS.values() for lt in info.loss_types})


# What beta means per method (the defaults come from the table; a test keeps the keys the table's).
BETA_MEANINGS = {"dpo": "the KL penalty; zephyr uses 0.01", "ipo": "the KL penalty", "kto": "the KL penalty",
                 "orpo": "the odds-ratio weight lambda", "simpo": "the reward scale", "slic": "the hinge margin",
                 "grpo": "the KL coefficient", "eval": "scores a model trained without one"}


def beta_description() -> str:
    return ("Preference strength; per method, its default and meaning: " + "; ".join(
        f"{m} {info.beta:g} ({BETA_MEANINGS[m]})" for m, info in METHODS.items() if info.beta is not None)
        + ". An eval stage scores with the evaluated stage's beta.")


def loss_type_description() -> str:
    return ("TRL loss_type, per method (the first its default): "
            + grouped((m, ", ".join(info.loss_types)) for m, info in METHODS.items() if info.loss_types)
            + ". Beyond TRL: cdpo (the original DPO code's conservative DPO, with labelSmoothing) and ipo_sum (that "
            "code's IPO on summed log-probs; TRL's ipo averages each reply's log-ratio over its tokens). "
            + ", ".join(m for m, info in METHODS.items() if info.trains and not info.loss_types) + " take none.")


def learning_rate_description() -> str:
    return ("Peak learning rate. Default per method, full fine-tuning: "
            + ", ".join(f"{m} {info.learning_rate:g}" for m, info in METHODS.items() if info.trains)
            + "; with lora (LoRA and QLoRA), an adapter's: "
            + ", ".join(f"{m} {info.lora_learning_rate:.0e}" for m, info in METHODS.items()
                        if info.trains and info.lora_learning_rate is not None)
            + " (10x: alignment-handbook's QLoRA recipes train sft at 2e-4 and dpo at 5e-6).")


# The losses that read training.label_smoothing (epsilon, the assumed fraction of flipped labels):
# TRL 1.16's DPOTrainer reads it in robust, exo_pair, aot and aot_unpaired only (trl/trainer/
# dpo_trainer.py, _compute_loss), ours in cdpo (losses.py). Every other loss and method
# ignores it (sigmoid, ipo, KTO, and SimPO, SLiC, ORPO, whose configs the stage never gives it).
LABEL_SMOOTHING_LOSSES = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
# Of those, the ones that mean nothing without it: cdpo is plain DPO at 0, TRL's exo_pair raises.
LABEL_SMOOTHING_NEEDED = ("cdpo", "exo_pair")


def label_smoothing_problem(method: str, loss_type: str | None, label_smoothing: float,
                            loss_field: str = "loss_type") -> str | None:
    """Why `label_smoothing` is wrong for `method` trained with `loss_type` (None: the method's
    default loss), or None: the value, and which losses read it. loss_field names the loss field
    as the caller's document does (lossType in a run)."""
    loss = loss_type or METHODS[method].default_loss_type
    accepted = ", ".join(LABEL_SMOOTHING_LOSSES)
    if label_smoothing and loss not in LABEL_SMOOTHING_LOSSES:
        trains = f"{loss_field} {loss}" if loss else f"no {loss_field}"
        return (f"{label_smoothing} is ignored by method {method} with {trains}: only the losses {accepted} "
                f"read it (dpo's {loss_field}); set one of them or leave it 0")
    if not label_smoothing and loss in LABEL_SMOOTHING_NEEDED:
        example = "the EXO paper recommends 1e-3" if loss == "exo_pair" else "e.g. 0.1"
        return (f"{label_smoothing} with {loss_field} {loss}; {loss} needs an epsilon, the assumed fraction of "
                f"flipped labels, with 0 < epsilon < 0.5 ({example})")
    return None


def loss_type_problem(method: str, loss_type: str | None) -> str | None:
    """Why `loss_type` cannot train `method`, or None."""
    known = METHODS[method].loss_types
    if loss_type is None or loss_type in known:
        return None
    return f"{loss_type!r} is not a {method} loss; accepted: {', '.join(known) or 'none (leave it unset)'}"
