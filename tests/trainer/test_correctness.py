"""The stages train what their recipe means (issue 11), each measured on the tiny model:

- full fine-tuning steps fp32 master weights (a bf16 model's AdamW update at lr 5e-7 is
  otherwise below bf16's resolution), and final/ is saved in model.dtype;
- LoRA DPO/KTO build one model: the adapter-disabled base is the reference;
- KTO's KL completions come from other prompts;
- precomputed reference log-probs work across two processes and give the live reference's loss;
- SFT on chats trains on exactly the assistant replies, for any chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer

ZEPHYR_TEMPLATE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "examples" / "zephyr-run.yaml").read_text())["spec"]["model"]["chatTemplate"]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(method: str, model: str, datasets: list[str], out: Path, dtype: str = "float32", **training):
    from alignment_trainer.recipe import Recipe

    return Recipe.model_validate({
        "method": method, "model": {"model_name_or_path": model, "torch_dtype": dtype},
        "datasets": [{"path": p} for p in datasets], "output_dir": str(out),
        "training": {"gradient_checkpointing": False, "max_length": 96, "per_device_train_batch_size": 8,
                     "logging_steps": 1, "save_steps": 1000, **training}})


# ---------------------------------------------------------------------------- fp32 master weights

def test_bf16_full_finetuning_steps_fp32_masters_and_saves_bf16(tmp_path, tiny_model, data_dir):
    """dtype bfloat16, one process, lr 5e-7, 10 steps: >99% of the stepped weights change (a bf16
    copy updated in place changes ~1%), and final/ holds bfloat16 weights (model.dtype)."""
    import torch
    from safetensors import safe_open
    from transformers import TrainerCallback

    from alignment_trainer import training
    from alignment_trainer.stages import sft

    class Stepped(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self.dtypes = {p.dtype for p in model.parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kw):
            after = dict(model.named_parameters())
            changed = sum(int((after[n].detach() != b).sum()) for n, b in self.before.items())
            self.fraction = changed / sum(b.numel() for b in self.before.values())

    recipe = _recipe("sft", tiny_model, [str(data_dir / "sft.jsonl")], tmp_path / "out", dtype="bfloat16",
                     max_steps=10, learning_rate=5e-7, lr_scheduler_type="constant", warmup_ratio=0.0)
    trainer, tokenizer = sft.build(recipe)
    stepped = Stepped()
    trainer.add_callback(stepped)
    output = trainer.train()
    assert stepped.dtypes == {torch.float32}, "the optimizer steps float32 master weights"
    assert stepped.fraction > 0.99, f"only {stepped.fraction:.2%} of the weights changed in 10 steps"

    training.finish_stage(trainer, recipe, tokenizer, output)
    final = tmp_path / "out" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------- one model under LoRA

@pytest.mark.parametrize("method, data", [("dpo", "prefs.jsonl"), ("kto", "kto.jsonl")])
def test_lora_builds_one_model_the_reference_is_the_adapter_disabled_base(tmp_path, tiny_model, data_dir,
                                                                          monkeypatch, method, data):
    from transformers import AutoModelForCausalLM

    from alignment_trainer.stages import dpo, kto

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real(cls, *a, **k)))
    stage = dpo if method == "dpo" else kto
    lora = _recipe(method, tiny_model, [str(data_dir / data)], tmp_path / "lora", max_steps=1)
    lora = type(lora).model_validate({**lora.model_dump(), "lora": {"r": 4, "lora_alpha": 8},
                                      "ref_model": tiny_model})  # ref_model: the start model, as rendered
    trainer, _ = stage.build(lora)
    assert len(loads) == 1 and trainer.ref_model is None

    loads.clear()
    full = _recipe(method, tiny_model, [str(data_dir / data)], tmp_path / "full", max_steps=1)
    trainer, _ = stage.build(full)
    assert len(loads) == 2, "full fine-tuning: policy and a reference loaded like it"
    policy, ref = trainer.model, trainer.ref_model
    assert next(ref.parameters()).dtype == next(policy.parameters()).dtype


# ---------------------------------------------------------------------------- KTO's KL pairs

def _own_prompt_kl_pairs(trainer) -> tuple[int, int]:
    """KL pairs TRL built whose completion is a real reply to the row's own prompt (TRL's own
    train_dataset: its prompt_ids, completion_ids and KL_completion_ids columns)."""
    ds = trainer.train_dataset
    real = {(tuple(p), tuple(c)) for p, c in zip(ds["prompt_ids"], ds["completion_ids"])}
    own = sum((tuple(p), tuple(k)) in real for p, k in zip(ds["prompt_ids"], ds["KL_completion_ids"]))
    return own, len(ds)


def test_kto_kl_completions_come_from_other_prompts(tmp_path, tiny_model, monkeypatch, kit):
    """400 pairs with distinct prompts -> 800 rows. In the rows' given order TRL's rotation pairs
    half of them with their own prompt's other reply; after kl_order, none."""
    from alignment_trainer.stages import kto

    rows = [{"prompt": f"Question {i}: what about item {i}?", "chosen": f"Item {i} is fine.",
             "rejected": f"No {i}."} for i in range(400)]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = _recipe("kto", tiny_model, [path], tmp_path / "out", max_steps=1)

    own, n = _own_prompt_kl_pairs(kto.build(recipe)[0])
    assert (own, n) == (0, 800)

    monkeypatch.setattr(kto, "kl_order", lambda dataset, *a, **k: dataset)  # the order before issue 11
    own_before, _ = _own_prompt_kl_pairs(kto.build(recipe)[0])
    assert own_before >= 0.45 * n


def test_kto_order_interleaves_a_mixture_and_separates_repeated_prompts():
    from alignment_trainer.stages.kto import arrange

    rows = [("a", i) for i in range(12)] + [("b", i) for i in range(12)] + [("c", i) for i in range(8)]
    order, clashes = arrange(rows, key=lambda r: r[0], batch_size=8)
    assert clashes == 0 and sorted(order) == sorted(rows)
    for start in range(0, len(order), 8):
        batch = order[start:start + 8]
        assert all(batch[j][0] != batch[j - 1][0] for j in range(len(batch)))  # j=0: first vs last


# ---------------------------------------------------------------------------- SFT masks

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about cats."},
        {"role": "assistant", "content": "Cats purr."}, {"role": "user", "content": "And dogs?"},
        {"role": "assistant", "content": "Dogs bark."}]


@pytest.mark.parametrize("template", ["chatml", "zephyr"])
def test_sft_on_chats_trains_exactly_the_assistant_replies(tmp_path, tiny_model, kit, template):
    from alignment_trainer.recipe import ModelArgs
    from alignment_trainer.stages import sft

    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    recipe = _recipe("sft", tiny_model, [path], tmp_path / "out", max_steps=1, per_device_train_batch_size=2)
    if template == "zephyr":
        recipe.model = ModelArgs(**{**recipe.model.model_dump(), "chat_template": ZEPHYR_TEMPLATE})
    trainer, tokenizer = sft.build(recipe)
    row = trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    eos = tokenizer.eos_token
    assert tokenizer.decode(trained) == f"Cats purr.{eos}Dogs bark.{eos}"  # each reply through its end of turn
    # the whole conversation is still the input: system and user turns are context
    assert "Be brief." in tokenizer.decode(row["input_ids"]) and "And dogs?" in tokenizer.decode(row["input_ids"])


def test_sft_whole_sequence_opt_out_and_prompt_completion_masking(tmp_path, tiny_model, kit):
    from alignment_trainer.stages import sft

    write = _jsonl
    chats = write(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    recipe = _recipe("sft", tiny_model, [chats], tmp_path / "a", max_steps=1, completion_only_loss=False)
    row = sft.build(recipe)[0].train_dataset[0]
    assert -100 not in row.get("labels", row["input_ids"]), "completion_only_loss false: every token trains"

    pc = write(tmp_path / "pc.jsonl", [{"prompt": "Tell me about cats.", "completion": "Cats purr."}] * 4)
    trainer, tokenizer = sft.build(_recipe("sft", tiny_model, [pc], tmp_path / "b", max_steps=1))
    row = trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(trained).startswith("Cats purr.")


# ---------------------------------------------------------------------------- precomputed reference

@pytest.mark.slow
def test_precomputed_reference_two_processes_matches_the_live_reference(tmp_path, tiny_model, data_dir, kit):
    """DPO on two CPU processes (ddp, gloo) with precompute_ref_log_probs runs to the end, and its
    first loss equals the same run's with the reference live. The reference is another model than
    the policy, so the step-0 loss is not log 2 by construction: wrong or misaligned log-probs
    would show. Both runs are also the DDP launch's test (test_distributed checks ZeRO-3's): the
    main process alone prints the start, with world size 2; 6 steps of 2 processes x 4 rows cover
    48 rows (accelerate counted both processes); final/ loads whole with plain transformers and
    holds the trained weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment_trainer.launch import build_launch_command, launch_env
    from test_distributed import loads_complete

    reference = tmp_path / "reference"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(reference)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(reference)

    first = {}
    for precompute in (True, False):
        d = tmp_path / ("precomputed" if precompute else "live")
        path = kit.write_recipe(d, "dpo", tiny_model, [str(data_dir / "prefs.jsonl")],
                                [str(data_dir / "prefs_test.jsonl")], ref_model=str(reference),
                                training={"max_steps": 6, "learning_rate": 1e-4, "per_device_train_batch_size": 4,
                                          "max_length": 64, "logging_steps": 1, "save_steps": 3,
                                          "gradient_checkpointing": False, "precompute_ref_log_probs": precompute})
        proc = kit.run_subprocess(build_launch_command(path, "ddp", 2, cpu=True), env=launch_env(cpu=True),
                                  timeout=420)
        starts = [e for e in kit.events(proc.stdout) if e["event"] == "start"]
        assert len(starts) == 1 and starts[0]["world_size"] == 2, starts
        result = json.loads((d / "out" / "result.json").read_text())
        assert result["global_step"] == 6
        assert kit.metrics(d / "out")[-1]["epoch"] == pytest.approx(48 / 256, abs=0.01)
        loads_complete(d / "out" / "final", tiny_model)
        first[precompute] = kit.losses(d / "out")[0]
        if precompute:
            assert list((d / "out" / "cache").glob("train-*.arrow")), "the shared dataset file all processes read"
    assert abs(first[True] - 0.6931) > 1e-3, "policy and reference differ, so step 0 is not log 2"
    assert first[True] == pytest.approx(first[False], abs=1e-5)


# ---------------------------------------------------------------------------- eval: the evaluated stage's beta

def test_zephyr_eval_scores_rewards_with_the_dpo_stages_beta_and_lengths():
    from alignment_operator.api import AlignmentRun
    from alignment_operator.render.recipe import build_recipe

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "zephyr-run.yaml").read_text())
    run = AlignmentRun.model_validate(doc)
    names = [s.name for s in run.spec.stages]
    ev = build_recipe(run, names.index("eval"), "/workspace")
    assert ev.training.beta == 0.01, "the dpo stage's beta, not the eval default 0.1"
    assert (ev.training.max_length, ev.training.max_prompt_length) == (1024, 512)
    # an eval stage's own setting wins
    doc["spec"]["stages"][names.index("eval")]["training"] = {"beta": 0.5, "maxLength": 256}
    ev = build_recipe(AlignmentRun.model_validate(doc), names.index("eval"), "/workspace")
    assert (ev.training.beta, ev.training.max_length, ev.training.max_prompt_length) == (0.5, 256, 128)


def test_eval_reports_pairs_without_response_tokens_apart():
    from alignment_trainer.stages.eval import preference_metrics

    # pairs: (chosen, rejected) log-prob sums and token counts; pair 2 kept no response token
    lp = [(-1.0, 3), (-5.0, 3), (-2.0, 2), (-1.0, 2), (0.0, 0), (0.0, 0)]
    ref = [(-3.0, 3), (-3.0, 3), (-2.0, 2), (-2.0, 2), (0.0, 0), (0.0, 0)]
    m = preference_metrics(lp, ref, beta=0.01)
    assert (m["scored_pairs"], m["unscored_pairs"]) == (2, 1)
    assert m["preference_accuracy"] == 0.5  # of the two scored pairs; the unscored one is not "wrong"
    assert m["reward_margin"] == pytest.approx((0.01 * (2 - -2) + 0.01 * (0 - 1)) / 2)


def test_eval_cuts_prompts_as_training_does(tiny_model):
    """A prompt longer than max_prompt_length loses whole early turns (training.truncate_prompt), as in
    the training stages, and the reply is still scored."""
    from alignment_trainer.model import load_tokenizer
    from alignment_trainer.recipe import ModelArgs
    from alignment_trainer.training import truncate_prompt
    from alignment_trainer.eval_rows import Encoder

    tokenizer = load_tokenizer(ModelArgs(model_name_or_path=tiny_model))
    prompt = [{"role": "user", "content": "Tell me about cats. " * 6}, {"role": "assistant", "content": "Cats."},
              {"role": "user", "content": "And dogs?"}]
    reply = [{"role": "assistant", "content": "Dogs bark."}]
    kept = truncate_prompt(prompt, tokenizer, 24)
    assert kept == prompt[2:]
    ids, mask = Encoder(tokenizer, 64, 24)(prompt + reply, len(prompt))
    assert Encoder(tokenizer, 64)(kept + reply, len(kept)) == (ids, mask)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Dogs bark." + tokenizer.eos_token


# ---------------------------------------------------------------------------- SimPO / ORPO tokens

@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_simpo_orpo_replies_end_with_one_end_of_turn(tmp_path, tiny_model, data_dir, method):
    from alignment_trainer.stages import dpo

    recipe = _recipe(method, tiny_model, [str(data_dir / "prefs.jsonl")], tmp_path / "out", max_steps=1)
    trainer, tokenizer = dpo.build(recipe)
    row = trainer.train_dataset[0]
    eos = tokenizer.eos_token_id
    for key in ("chosen", "rejected"):
        labels = [t for t in row[f"{key}_labels"] if t != -100]
        # one end of turn, where the chat template puts it (before: "<|im_end|>\n<|im_end|>")
        assert labels[-1] == eos and labels.count(eos) == 1, tokenizer.decode(labels)
        assert row[f"{key}_input_ids"][-1] == eos and row[f"{key}_input_ids"][-2] != eos


def test_shp_keeps_pairs_whose_scores_differ_at_least_twofold():
    from alignment_trainer.data import normalise_preference

    def row(a, b, label=1):
        return {"post_id": "p", "history": f"Question {a} {b}?", "human_ref_A": "Answer A.", "human_ref_B": "Answer B.",
                "labels": label, "score_A": a, "score_B": b}

    kept = normalise_preference([row(10, 5), row(10, 6), row(3, 9, 0), row(4, 4)], "shp").to_list()
    assert [r["prompt"][0]["content"] for r in kept] == ["Question 10 5?", "Question 3 9?"]


# ---------------------------------------------------------------------------- LoRA merge: false, then more

def test_a_stage_starts_from_an_unmerged_lora_adapter(tmp_path, tiny_model, data_dir):
    """sft (LoRA, merge false: final/ is an adapter) -> dpo (LoRA, merge false) -> a model loaded
    from dpo's final/ carries both adapters (was: `Unrecognized model` in the dpo stage)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignment_trainer.model import load_model, load_tokenizer
    from alignment_trainer.recipe import ModelArgs

    lora = {"r": 4, "lora_alpha": 8, "merge": False}
    sft = _recipe("sft", tiny_model, [str(data_dir / "sft.jsonl")], tmp_path / "sft", max_steps=2,
                  learning_rate=1e-2)
    sft = type(sft).model_validate({**sft.model_dump(), "lora": lora})
    from alignment_trainer.__main__ import run_recipe

    run_recipe(sft)
    sft_final = tmp_path / "sft" / "final"
    assert (sft_final / "adapter_config.json").is_file()
    dpo = _recipe("dpo", str(sft_final), [str(data_dir / "prefs.jsonl")], tmp_path / "dpo", max_steps=2,
                  learning_rate=1e-2)
    result = run_recipe(type(dpo).model_validate({**dpo.model_dump(), "lora": lora, "ref_model": str(sft_final)}))
    assert result["global_step"] == 2

    args = ModelArgs(model_name_or_path=str(tmp_path / "dpo" / "final"), torch_dtype="float32")
    tokenizer = load_tokenizer(args)
    both = load_model(args, tokenizer)
    after_sft = load_model(ModelArgs(model_name_or_path=str(sft_final), torch_dtype="float32"), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    name = "model.layers.0.self_attn.q_proj.weight"
    weights = [dict(m.named_parameters())[name] for m in (base, after_sft, both)]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_kto_reads_its_kl_batches_in_a_new_order_each_epoch(tmp_path, tiny_model, data_dir):
    from alignment_trainer.stages import kto

    recipe = _recipe("kto", tiny_model, [str(data_dir / "kto.jsonl")], tmp_path / "out", max_steps=1)
    trainer, _ = kto.build(recipe)
    sampler = trainer._get_train_sampler()
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    n = len(trainer.train_dataset)
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
    for order in epochs:  # whole blocks of 8, each the rows TRL paired together
        blocks = [order[i:i + 8] for i in range(0, n, 8)]
        assert all(b == list(range(b[0], b[0] + len(b))) and b[0] % 8 == 0 for b in blocks)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["KL_input_ids"].shape[0] == 8
