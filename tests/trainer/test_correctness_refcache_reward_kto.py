"""The stages train what their recipe means, round 2 (issue 24, items 1, 3 and 8), each measured on the
tiny model:

- the cross-stage reference log-prob cache is keyed by the reference's weights (also under DeepSpeed
  ZeRO-3, where TRL's hash sees only empty placeholders), the truncation mode and the whole tokenizer;
- the reward stage cuts pairs longer than max_length as DPO does, where TRL's RewardTrainer dropped them;
- KTO's held-out KL completions come from other prompts, as the training split's do.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def _head(source: Path, n: int, target: Path) -> str:
    """The first n rows of a JSONL file (the conftest data: 64 train and 16 held-out pairs)."""
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return str(target)


def _recipe(method: str, model: str, train: str, test: str | None, out: Path, **training):
    from alignment_trainer.recipe import Recipe

    return Recipe.model_validate({
        "method": method, "model": {"model_name_or_path": model, "torch_dtype": "float32"},
        "datasets": [{"path": train}], "test_datasets": [{"path": test}] if test else [],
        "output_dir": str(out),
        "training": {"gradient_checkpointing": False, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "save_steps": 1000, **training}})


# ---------------------------------------------------------------------------- 3: reward truncation

def test_reward_stage_cuts_long_pairs_as_dpo_does_and_counts_them(tmp_path, tiny_model, data_dir):
    """max_length 27 on 64 train / 16 held-out pairs: TRL's RewardTrainer kept 23 and 10 (the short
    replies only); now all are kept, each side cut like DPO's collator cuts (keep_start: the first 27
    tokens; keep_end: the last 27), and result.json counts the pairs read, kept and cut per split."""
    from alignment_trainer.stages import reward

    train = _head(data_dir / "prefs.jsonl", 64, tmp_path / "train.jsonl")
    test = _head(data_dir / "prefs_test.jsonl", 16, tmp_path / "test.jsonl")
    recipe = _recipe("reward", tiny_model, train, test, tmp_path / "start", max_length=27, max_prompt_length=13,
                     max_steps=1, per_device_eval_batch_size=16, learning_rate=1e-3)
    trainer, _ = reward.build(recipe)
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (64, 16)
    row = trainer.train_dataset[0]
    assert max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 27

    # The same pairs untruncated: keep_start kept their start, keep_end their end (the end-of-turn token)
    untruncated = _recipe("reward", tiny_model, train, None, tmp_path / "full", max_length=4096,
                          max_prompt_length=13, max_steps=1)
    full = reward.build(untruncated)[0].train_dataset
    long = [i for i, c in enumerate(full["chosen_ids"]) if len(c) > 27]
    assert len(long) >= 30, "most chosen replies are longer than 27 tokens"
    assert all(trainer.train_dataset[i]["chosen_ids"] == full[i]["chosen_ids"][:27] for i in long)
    keep_end = _recipe("reward", tiny_model, train, None, tmp_path / "end", max_length=27, max_prompt_length=13,
                       max_steps=1, extra_args={"truncation_mode": "keep_end"})
    ends = reward.build(keep_end)[0].train_dataset
    assert all(ends[i]["chosen_ids"] == full[i]["chosen_ids"][-27:] for i in long)

    # The whole stage: the counts reach result.json
    from alignment_trainer.__main__ import run_recipe

    result = run_recipe(recipe)
    assert result["train_pairs"] == 64 and result["train_pairs_read"] == 64 and result["train_pairs_dropped"] == 0
    assert result["train_pairs_truncated"] == len({*long} | {i for i, r in enumerate(full["rejected_ids"])
                                                              if len(r) > 27})
    assert result["eval_pairs"] == 16 and result["eval_pairs_truncated"] > 0

    # A pair cut to the same tokens on both sides holds nothing to learn: dropped, and counted
    from datasets import Dataset

    pairs = Dataset.from_dict({"chosen_ids": [[1, 2, 3, 4, 5], [1, 2]], "rejected_ids": [[1, 2, 3, 9], [1, 3]]})
    kept, counts = reward.truncate_pairs(pairs, 3, "keep_start")
    assert counts == {"read": 2, "kept": 1, "truncated": 1, "dropped": 1} and list(kept["chosen_ids"]) == [[1, 2]]
    assert reward.truncate_pairs(pairs, 3, "keep_end")[1]["dropped"] == 0

    with pytest.raises(ValueError, match="truncation_mode: 'keep_middle' is not one of keep_start, keep_end"):
        reward.build(_recipe("reward", tiny_model, train, None, tmp_path / "bad", max_length=27,
                             extra_args={"truncation_mode": "keep_middle"}))


# ---------------------------------------------------------------------------- 8: KTO's held-out KL pairs

def _own_prompt_kl_rows(dataset, block: int) -> int:
    """Rows whose KL completion is from a row with the same prompt: TRL gives row i of each block of
    `block` rows the completion of row i-1 (the first row the last one's)."""
    prompts = [tuple(p) for p in dataset["prompt_ids"]]
    own = 0
    for start in range(0, len(prompts), block):
        rows = prompts[start:start + block]
        own += sum(rows[i] == rows[i - 1] for i in range(len(rows)))
    return own


def test_kto_held_out_kl_completions_come_from_other_prompts(tmp_path, tiny_model, data_dir):
    """64 train / 16 held-out pairs (-> 128 / 32 unpaired rows), batch 4: 18 of the 32 held-out rows
    took their KL completion from their own prompt's other reply (the held-out rows kept their given
    order); now none, as in training."""
    from alignment_trainer.stages import kto

    train = _head(data_dir / "prefs.jsonl", 64, tmp_path / "train.jsonl")
    test = _head(data_dir / "prefs_test.jsonl", 16, tmp_path / "test.jsonl")
    trainer, _ = kto.build(_recipe("kto", tiny_model, train, test, tmp_path / "out", max_length=96, max_steps=1))
    held_out = trainer.eval_dataset
    assert len(held_out) == 32 and "KL_completion_ids" in held_out.column_names
    assert _own_prompt_kl_rows(held_out, 4) == 0
    # Training's rows: 1 of 128 before (the greedy order ran into a corner; kto.separate swaps it away)
    assert _own_prompt_kl_rows(trainer.train_dataset, 4) == 0


# ---------------------------------------------------------------------------- 1: the reference cache's key

def _dpo_stage(kit, directory: Path, model: str, train: str, test: str, cache: Path, **training) -> dict:
    path = kit.write_recipe(directory, "dpo", model, [train], [test], cache_dir=str(cache),
                            training={"max_steps": 1, "learning_rate": 1e-4, "per_device_train_batch_size": 4,
                                      "max_length": 64, "logging_steps": 1, "save_steps": 100,
                                      "gradient_checkpointing": False, "precompute_ref_log_probs": True,
                                      **training})
    return kit.run_in_process(path)


def test_reference_cache_key_holds_the_truncation_mode_and_the_whole_tokenizer(tmp_path, tiny_model, data_dir,
                                                                               kit):
    """One reference, one cache, max_length 24 (most pairs are cut): keep_end after keep_start computes
    its own log-probs (at 73214b4 it read keep_start's: step-0 loss 2.286, not ln 2), and so does a
    tokenizer replaced in place by one of the same length and special tokens that maps the data's text
    to other ids (at 73214b4 only by accident: the rows' key held the datasets fingerprint of the
    prompt-cutting map, which hashes the pickled tokenizer; now refcache.tokenizer_fingerprint). The
    weights' hash is TRL's own where nothing is partitioned."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import hash_module

    reference = tmp_path / "reference"
    shutil.copytree(tiny_model, reference)
    train = _head(data_dir / "prefs.jsonl", 32, tmp_path / "train.jsonl")
    test = _head(data_dir / "prefs_test.jsonl", 8, tmp_path / "test.jsonl")
    cache = tmp_path / "cache"
    stage = lambda name, **t: _dpo_stage(kit, tmp_path / name, str(reference), train, test, cache,  # noqa: E731
                                         max_length=24, max_prompt_length=16, **t)
    assert stage("start")["reference_logps"] == "computed"
    assert stage("rerun")["reference_logps"] == "reused", "the same stage again reads its log-probs back"
    assert stage("keep-end", extra_args={"truncation_mode": "keep_end"})["reference_logps"] == "computed"
    assert kit.losses(tmp_path / "keep-end" / "out")[0] == pytest.approx(math.log(2), abs=1e-4)

    # Swap the ids of the prompts' first two tokens in the tokenizer at the same path: same length and
    # special tokens, other ids for the same text.
    tokenizer = AutoTokenizer.from_pretrained(reference)
    a, b = tokenizer.convert_ids_to_tokens(tokenizer("Tell me about", add_special_tokens=False)["input_ids"][:2])
    doc = json.loads((reference / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (reference / "tokenizer.json").write_text(json.dumps(doc))
    swapped = AutoTokenizer.from_pretrained(reference)
    assert len(swapped) == len(tokenizer) and swapped("Tell")["input_ids"] != tokenizer("Tell")["input_ids"]
    assert stage("tokenizer")["reference_logps"] == "computed"
    assert kit.losses(tmp_path / "tokenizer" / "out")[0] == pytest.approx(math.log(2), abs=1e-4)
    assert len(list(cache.glob("train-*.logps.arrow"))) == 3

    from alignment_trainer.refcache import weights_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert weights_fingerprint(model) == hash_module(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert weights_fingerprint(model) != hash_module(AutoModelForCausalLM.from_pretrained(tiny_model))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two two-process ZeRO-3 stages and two one-process stages
def test_zero3_reference_replaced_at_the_same_path_is_recomputed(tmp_path, tiny_model, data_dir, kit):
    """DPO with precomputed reference log-probs, one shared cache, the reference's weights replaced at
    the same path after a stage computed log-probs with the old ones: a two-process DeepSpeed ZeRO-3
    stage computes them anew (step-0 loss ln 2: policy = reference), keyed by the new weights' hash,
    a ZeRO-3 stage on the same training split and other held-out rows reads the training split's back
    (issue 18's speed-up) and computes the held-out split's, and a one-process stage reads them back
    too (the key is the weights' own hash, not the hash of ZeRO-3's partitions). At 73214b4 the ZeRO-3
    key was TRL's hash over ZeRO-3's empty placeholders, the same for every model of the architecture: a
    ZeRO-3 stage rerun after the replacement read the old log-probs ('reused', step-0 loss 0.7318).
    At b32d1b9 the stage that read one split and computed the other (one batch per rank) failed at its
    first step (IndexError: pop from an empty deque, refcache.release_precompute_engine)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import hash_module

    from alignment_trainer.launch import build_launch_command, launch_env

    reference = tmp_path / "reference"
    shutil.copytree(tiny_model, reference)
    train = _head(data_dir / "prefs.jsonl", 64, tmp_path / "train.jsonl")
    test = _head(data_dir / "prefs_test.jsonl", 16, tmp_path / "test.jsonl")
    cache = tmp_path / "cache"

    def recipe(name: str, test: str = test) -> tuple[str, Path]:
        directory = tmp_path / name
        return kit.write_recipe(directory, "dpo", str(reference), [train], [test], cache_dir=str(cache),
                                training={"max_steps": 1, "learning_rate": 1e-4, "per_device_train_batch_size": 4,
                                          "max_length": 64, "logging_steps": 1, "save_steps": 100,
                                          "gradient_checkpointing": False, "precompute_ref_log_probs": True},
                                ), directory / "out"

    def zero3(name: str, **test) -> tuple[dict, Path]:
        """A two-process ZeRO-3 stage: which splits read their log-probs from the cache, its output dir."""
        path, out = recipe(name, **test)
        proc = kit.run_subprocess(build_launch_command(path, "deepspeed-zero3", 2, cpu=True),
                                  env=launch_env(cpu=True), timeout=600)
        events = kit.events(proc.stdout)
        assert [e["world_size"] for e in events if e["event"] == "start"] == [2]
        [splits] = [e["splits"] for e in events if e["event"] == "reference_logps" and "splits" in e]
        return splits, out

    def entries() -> dict[str, str]:
        """The cache's log-probs files, each with the weights' hash it was keyed by (the .json beside it)."""
        return {p.name: json.loads(p.with_name(p.name.replace(".arrow", ".json")).read_text())["weights"]
                for p in cache.glob("*.logps.arrow")}

    # The old weights: a one-process stage computes the train and test splits' log-probs.
    assert kit.run_in_process(recipe("old")[0])["reference_logps"] == "computed"
    old = entries()
    assert len(old) == 2 and set(old.values()) == {hash_module(AutoModelForCausalLM.from_pretrained(reference))}

    # Other weights written over the reference's file (its path, config and tokenizer unchanged)
    weights = reference / "model.safetensors"
    noise = torch.Generator().manual_seed(1)
    save_file({name: t + 0.05 * torch.randn(t.shape, generator=noise) for name, t in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    reused, out = zero3("zero3")
    assert (reused, round(kit.losses(out)[0], 4)) == ({"train": False, "eval": False}, round(math.log(2), 4)), \
        "a policy scored against itself"
    new = {name: weights for name, weights in entries().items() if name not in old}
    new_hash = hash_module(AutoModelForCausalLM.from_pretrained(reference))
    assert len(new) == 2 and set(new.values()) == {new_hash}

    # The same training split, 16 other held-out rows (one batch per rank): the training split's log-probs
    # are read back, the held-out split's computed. The first step's learning rate is 0 (warmup), so the
    # policy is still the reference: both losses are ln 2 only if each split's log-probs are its own.
    other = tmp_path / "test-other.jsonl"
    other.write_text("".join((data_dir / "prefs_test.jsonl").read_text().splitlines(keepends=True)[16:32]))
    reused, out = zero3("zero3-rerun", test=str(other))
    assert reused == {"train": True, "eval": False}
    result = json.loads((out / "result.json").read_text())
    assert (round(kit.losses(out)[0], 4), round(result["eval_loss"], 4)) == (round(math.log(2), 4),) * 2
    added = {name: weights for name, weights in entries().items() if name not in old and name not in new}
    assert [name.split("-")[0] for name in added] == ["test"] and set(added.values()) == {new_hash}

    path, out = recipe("one-process")
    assert kit.run_in_process(path)["reference_logps"] == "reused"
    assert kit.losses(out)[0] == pytest.approx(math.log(2), abs=1e-4)
    assert len(entries()) == 5, "nothing new was written"


def test_eval_reference_scores_are_keyed_by_the_hub_snapshot_a_revision_resolved_to(tmp_path, monkeypatch):
    """The eval stage's cached reference scores name a Hub reference by the snapshot its revision
    resolved to: when main moves to another commit the key changes (it was the id and 'main' alone)."""
    import huggingface_hub.constants

    from alignment_trainer.refcache import model_identity

    repo = tmp_path / "models--org--tiny"
    for commit, blob in (("a" * 40, "one"), ("c" * 40, "two")):
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_text(json.dumps({"weights": blob}))
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").symlink_to(repo / "blobs" / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    before = model_identity("org/tiny", "main")
    assert before["snapshot"] == "a" * 40 and list(before["files"]) == ["config.json"]
    (repo / "refs" / "main").write_text("c" * 40)  # the revision moved
    after = model_identity("org/tiny", "main")
    assert before != after and after["snapshot"] == "c" * 40
    assert model_identity("org/tiny", "main") == after, "the same snapshot names the same reference"
