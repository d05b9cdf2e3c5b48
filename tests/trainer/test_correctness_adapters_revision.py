"""The stages train what their recipe means, round 2 (issue 24, items 5-7), each on the tiny model:

- QLoRA adapters keep float32 master weights: TRL 1.16 casts a 4/8-bit base's trainable
  parameters to bfloat16, where 10 AdamW steps at preference learning rates leave most of lora_A
  unchanged (bitsandbytes needs CUDA: the quantized base is the tiny model flagged the way
  transformers flags a 4-bit one, which is all TRL's cast reads);
- LoRA/QLoRA stages that set no learning rate get an adapter's (10x full fine-tuning's);
- training.label_smoothing is refused where the loss ignores it;
- a pinned model.revision reaches every reference that is the base model: GRPO's TRL-built
  reference and the eval stage's, read through the real from_pretrained from a local Hub cache
  holding two revisions (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def _recipe(method: str, model: str, datasets: list[str], out: Path, lora: dict | None = None, **training):
    from alignment_trainer.recipe import Recipe

    return Recipe.model_validate({
        "method": method, "model": {"model_name_or_path": model, "torch_dtype": "float32"},
        "datasets": [{"path": p} for p in datasets], "output_dir": str(out), "lora": lora,
        "tracking": {"report_to": []},
        "training": {"gradient_checkpointing": False, "max_length": 96, "per_device_train_batch_size": 8,
                     "logging_steps": 1, "save_steps": 1000, **training}})


# ---------------------------------------------------------------------------- 5. QLoRA fp32 masters

def _as_4bit(load_model):
    """load_model whose trained model reads as a bitsandbytes 4-bit one (transformers sets
    is_loaded_in_4bit on those; TRL's cast tests exactly that attribute)."""
    def load(*args, **kwargs):
        model = load_model(*args, **kwargs)
        if kwargs.get("trainable"):
            model.is_loaded_in_4bit = True
        return model
    return load


def qlora_steps(tmp_path, tiny_model, data_dir, monkeypatch, lr: float, steps: int = 10) -> tuple[set, float]:
    """A LoRA SFT stage on a "4-bit" base through the stage's build and train path, `steps` AdamW
    steps at a constant `lr`: the dtypes the optimizer stepped and the fraction of lora_A entries
    that changed."""
    from transformers import TrainerCallback

    from alignment_trainer import training
    from alignment_trainer.stages import sft

    class Stepped(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
            self.dtypes = {p.dtype for p in model.parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kw):
            after = dict(model.named_parameters())
            changed = sum(int((after[n].detach() != b).sum()) for n, b in self.before.items())
            self.fraction = changed / sum(b.numel() for b in self.before.values())

    monkeypatch.setattr(sft, "load_model", _as_4bit(sft.load_model))
    recipe = _recipe("sft", tiny_model, [str(data_dir / "sft.jsonl")], tmp_path / f"out-{lr}",
                     lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}, max_steps=steps, learning_rate=lr,
                     lr_scheduler_type="constant", warmup_ratio=0.0)
    trainer, _ = sft.build(recipe)
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit, "TRL saw a quantized base"
    del base.is_loaded_in_4bit  # past TRL's cast; transformers' FLOP count would import bitsandbytes
    stepped = Stepped()
    trainer.add_callback(stepped)
    training.train(trainer, recipe)
    assert stepped.before, "the adapters have lora_A weights"
    return stepped.dtypes, stepped.fraction


@pytest.mark.parametrize("lr", [5e-7, 5e-6])
def test_qlora_adapters_step_fp32_masters(tmp_path, tiny_model, data_dir, monkeypatch, lr):
    """73214b4: TRL's bf16 adapters, 10 steps changed 0.21% of lora_A at lr 5e-7 and 2.67% at 5e-6;
    float32 masters: 99.97% and 100%."""
    import torch

    dtypes, fraction = qlora_steps(tmp_path, tiny_model, data_dir, monkeypatch, lr)
    print(f"lr {lr:g}: {fraction:.2%} of lora_A changed in 10 steps, dtypes {sorted(map(str, dtypes))}")
    assert dtypes == {torch.float32}, f"the optimizer steps {dtypes}, not float32 masters"
    assert fraction > 0.99, f"only {fraction:.2%} of lora_A changed in 10 AdamW steps at lr {lr:g}"


def test_keep_fp32_masters_leaves_engines_that_keep_their_own(monkeypatch):
    """Under DeepSpeed/FSDP the engine holds the fp32 copy (and ZeRO-3 needs one dtype): no cast."""
    import torch

    from alignment_trainer.model import keep_fp32_masters

    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert keep_fp32_masters(layer) == [] and layer.weight.dtype == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert keep_fp32_masters(layer) == ["weight", "bias"] and layer.weight.dtype == torch.float32


# ---------------------------------------------------------------------------- 5. adapter learning rates

@pytest.mark.parametrize("method, full, adapter", [("sft", 2e-5, 2e-4), ("dpo", 5e-7, 5e-6), ("kto", 5e-7, 5e-6)])
def test_adapter_stages_default_to_an_adapters_learning_rate(method, full, adapter):
    """73214b4: a LoRA/QLoRA stage without a learning rate trained at full fine-tuning's."""
    from alignment_operator.api import parse_run
    from alignment_operator.render.recipe import build_recipe

    stage = {"name": "s", "method": method, "datasets": [{"source": "d.jsonl"}]}
    doc = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
           "spec": {"model": {"source": "org/base"}, "stages": [stage]}}
    assert build_recipe(parse_run(doc), 0, "/workspace").training.learning_rate == full
    for quantization in ("none", "4bit"):
        stage.update(lora={"quantization": quantization}, resources={"gpusPerNode": 1})
        assert build_recipe(parse_run(doc), 0, "/workspace").training.learning_rate == adapter, quantization
    stage["training"] = {"learningRate": 1e-5}  # a rate the stage sets is kept
    assert build_recipe(parse_run(doc), 0, "/workspace").training.learning_rate == 1e-5


# ---------------------------------------------------------------------------- 6. label smoothing

def test_a_recipe_whose_loss_ignores_label_smoothing_is_refused():
    """73214b4: label_smoothing 0.1 on sigmoid DPO validated and trained as plain DPO (eps 0)."""
    from alignment_trainer.recipe import Recipe

    rows = {"method": "dpo", "model": {"model_name_or_path": "m"}, "datasets": [{"path": "d.jsonl"}],
            "output_dir": "o"}
    with pytest.raises(ValueError, match=r"training.label_smoothing: 0.1 is ignored by method dpo with loss_type "
                                         r"sigmoid: only the losses cdpo, robust, exo_pair, aot, aot_unpaired read"):
        Recipe.model_validate({**rows, "training": {"label_smoothing": 0.1}})
    for loss in ("cdpo", "robust"):  # the losses that read it keep it
        recipe = Recipe.model_validate({**rows, "training": {"label_smoothing": 0.1, "loss_type": loss}})
        assert recipe.training.label_smoothing == 0.1


# ---------------------------------------------------------------------------- 7. the pinned revision

PINNED = "b" * 40  # the commit refs/pinned names; refs/main names another with other weights


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_model) -> dict:
    """A local Hub cache holding the repo local/tiny at two revisions: `pinned` (the tiny model)
    and `main` (moved on: the same model with other weights), read offline."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--local--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, sha in (("pinned", PINNED), ("main", "a" * 40)):
        shutil.copytree(tiny_model, repo / "snapshots" / sha)
        (repo / "refs" / ref).write_text(sha)
    main = repo / "snapshots" / ("a" * 40)
    moved = AutoModelForCausalLM.from_pretrained(main)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moved.save_pretrained(main)
    return {"root": str(root), "pinned": str(repo / "snapshots" / PINNED)}


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_cache["root"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _same_weights(model, directory: str) -> bool:
    """Whether `model` holds exactly the weights saved in `directory` (every saved tensor)."""
    import torch
    from safetensors.torch import load_file

    saved, state = load_file(str(Path(directory) / "model.safetensors")), model.state_dict()
    assert set(saved) <= set(state), "the model has every saved tensor"
    return all(torch.equal(state[k].float(), v.float()) for k, v in saved.items())


def test_grpo_reference_loads_the_pinned_revision(tmp_path, offline_hub):
    """73214b4: TRL built GRPO's reference from the Hub's main, not the policy's pinned revision."""
    from alignment_trainer.recipe import Recipe
    from alignment_trainer.stages import grpo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                               for a in range(8)))
    recipe = Recipe.model_validate({
        "method": "grpo", "model": {"model_name_or_path": "local/tiny", "model_revision": "pinned",
                                    "torch_dtype": "float32"},
        "datasets": [{"path": str(prompts)}], "output_dir": str(tmp_path / "out"), "tracking": {"report_to": []},
        "grpo": {"rewards": [{"kind": "contains"}], "num_generations": 2, "max_completion_length": 8},
        "training": {"per_device_train_batch_size": 2, "max_steps": 1, "gradient_checkpointing": False}})
    trainer, *_ = grpo.build(recipe)
    assert _same_weights(trainer.model, offline_hub["pinned"]), "the policy starts from the pinned revision"
    assert trainer.ref_model is not None
    assert _same_weights(trainer.ref_model, offline_hub["pinned"]), "GRPO's reference is not the pinned revision"


def test_eval_reference_that_is_the_base_model_loads_its_pinned_revision(tmp_path, data_dir, offline_hub):
    """73214b4: the eval stage loaded its base-model reference at revision main. Rendered from a run
    pinning spec.model.revision, evaluating the base model (a local copy of it) against its reference
    gives reward margin 0 only if the reference is the pinned revision too."""
    from alignment_operator.api import parse_run
    from alignment_operator.render.recipe import build_recipe
    from alignment_trainer.stages import eval as eval_stage

    doc = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
           "spec": {"model": {"source": "local/tiny", "revision": "pinned", "dtype": "float32"}, "stages": [
               {"name": "sft", "method": "sft", "datasets": [{"source": "d.jsonl"}]},
               {"name": "eval", "method": "eval", "datasets": [{"source": "d.jsonl"}],
                "eval": {"metrics": ["preference"]}}]}}
    rendered = build_recipe(parse_run(doc), 1, str(tmp_path))
    assert (rendered.eval.reference_model, rendered.eval.reference_revision) == ("local/tiny", "pinned")
    # The evaluated model: the base model itself (a local copy standing in for the sft stage's final/).
    shutil.copytree(offline_hub["pinned"], tmp_path / "evaluated")
    recipe = rendered.model_copy(update={
        "model": rendered.model.model_copy(update={"model_name_or_path": str(tmp_path / "evaluated")}),
        "datasets": [rendered.datasets[0].model_copy(update={"path": str(data_dir / "prefs_test.jsonl")})],
        "cache_dir": None, "tracking": rendered.tracking.model_copy(update={"report_to": []})})
    result = eval_stage.run(recipe)
    assert result["scored_pairs"] == 32
    assert result["reward_margin"] == 0.0 and result["preference_accuracy"] == 0.0, result
    assert result["reference_logp_margin"] == result["logp_margin"]
