"""Model loading: chat template fallback, eos/pad consistency, LoRA merge, refusals on CPU,
and prompt truncation that keeps the end of the conversation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def _model_args(path, **kw):
    from alignment_trainer.recipe import ModelArgs

    return ModelArgs(model_name_or_path=str(path), torch_dtype="float32", **kw)


@pytest.fixture
def bare_model(tmp_path, tiny_model):
    """The tiny model with its chat template removed and a plain-LM eos, like a base checkpoint."""
    d = tmp_path / "bare"
    shutil.copytree(tiny_model, d)
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config["eos_token"] = "<|endoftext|>"
    config["pad_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = 0  # <|endoftext|>
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def test_chatml_fallback_makes_eos_the_end_of_turn(bare_model):
    from alignment_trainer.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(_model_args(bare_model))
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"  # the old eos, never the new one
    model = load_model(_model_args(bare_model), tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id == [im_end, 0]  # end of turn first, the old stop kept
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_recipe_chat_template_wins_and_must_end_turns(bare_model):
    from alignment_trainer.model import load_tokenizer

    zephyr = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert load_tokenizer(_model_args(bare_model, chat_template=zephyr)).eos_token == "<|im_end|>"

    never_ends = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="model.chat_template: an assistant turn must end"):
        load_tokenizer(_model_args(bare_model, chat_template=never_ends))


def test_qlora_and_flash_attention_refused_on_cpu(tiny_model):
    from alignment_trainer.model import load_model, load_tokenizer
    from alignment_trainer.recipe import LoraArgs

    tokenizer = load_tokenizer(_model_args(tiny_model))
    with pytest.raises(ValueError, match="lora.quantization: 4bit .*needs a CUDA GPU"):
        load_model(_model_args(tiny_model), tokenizer, lora=LoraArgs(quantization="4bit"))
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU"):
        load_model(_model_args(tiny_model, attn_implementation="flash_attention_2"), tokenizer)


def test_lora_run_merges_into_a_standalone_model(tmp_path, tiny_model, data_dir, kit):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                            training={"max_steps": 8, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                                      "max_length": 64, "logging_steps": 2, "save_steps": 4},
                            lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "merge": True})
    kit.run_in_process(path)
    final = tmp_path / "out" / "final"
    assert not (final / "adapter_config.json").exists()
    with safe_open(final / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k]

    merged = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no peft involved
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q]), "adapter was not merged"
    o = "model.layers.0.self_attn.o_proj.weight"  # not targeted: unchanged
    assert torch.equal(merged.state_dict()[o], base.state_dict()[o])


def test_prompt_truncation_keeps_the_end(tiny_model):
    from alignment_trainer.model import load_tokenizer
    from alignment_trainer.training import _prompt_length, truncate_prompt

    tokenizer = load_tokenizer(_model_args(tiny_model))
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about cats. " * 5},
            {"role": "assistant", "content": "Cats are wonderful. " * 5},
            {"role": "user", "content": "Tell me about dogs."}]
    assert truncate_prompt(chat, tokenizer, 10_000) == chat

    limit = _prompt_length(tokenizer, [chat[0], chat[3]]) + 2
    cut = truncate_prompt(chat, tokenizer, limit)
    assert cut == [chat[0], chat[3]]  # whole early turns dropped, system and last question kept

    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200)) + " FINAL QUESTION?"}]
    cut = truncate_prompt(long, tokenizer, 32)
    assert _prompt_length(tokenizer, cut) <= 32
    assert cut[0]["content"].endswith("FINAL QUESTION?") and "word0 " not in cut[0]["content"]


def test_lora_on_a_base_model_without_chat_tokens(tmp_path, data_dir, kit):
    """ChatML tokens added -> embeddings resized and trained beside the adapter -> merged model loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    from alignment_trainer.tiny import read_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(read_corpus(sorted(data_dir.glob("*.jsonl"))), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    base = tmp_path / "base"
    tokenizer.save_pretrained(base)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)

    path = kit.write_recipe(tmp_path / "run", "sft", str(base), [str(data_dir / "sft.jsonl")],
                            training={"max_steps": 4, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                                      "max_length": 64, "logging_steps": 2, "save_steps": 100},
                            lora={"r": 4, "lora_alpha": 8, "merge": True})
    kit.run_in_process(path)
    final = tmp_path / "run" / "out" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    trained_tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(trained_tokenizer) == len(tokenizer) + 2  # <|im_start|>, <|im_end|>
    assert merged.get_input_embeddings().weight.shape[0] >= len(trained_tokenizer)
    assert merged.generation_config.eos_token_id[0] == trained_tokenizer.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------- model sources

def _source_error(source, monkeypatch, offline: bool, endpoint: str | None = None):
    """check_source's error for `source`, timed: it must come in seconds, not after minutes of retries."""
    import time

    from huggingface_hub import constants

    from alignment_trainer.model import check_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises((ValueError, ConnectionError)) as info:
        check_source(source)
    return str(info.value), time.monotonic() - start


def test_a_missing_absolute_path_says_it_is_neither_a_directory_nor_a_hub_id(tmp_path, monkeypatch):
    missing = str(tmp_path / "models" / "llama")
    message, took = _source_error(missing, monkeypatch, offline=False)
    assert took < 2
    assert message.startswith(f"model.model_name_or_path: {missing!r} is not a model")
    assert f"as a local path: no such directory ({missing})" in message
    assert "as a Hugging Face Hub id: not one" in message and "Fix the path" in message


def test_a_hub_id_offline_and_not_cached_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    message, took = _source_error("someorg/some-model", monkeypatch, offline=True)
    assert took < 2
    assert "as a local path: no such directory" in message
    assert "as a Hub id (revision 'main'): not in the local Hub cache" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message and "unset HF_HUB_OFFLINE" in message


def test_a_hub_id_with_the_hub_unreachable_fails_in_seconds(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused, as behind a firewall
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    message, took = _source_error("someorg/some-model", monkeypatch, offline=False, endpoint=endpoint)
    assert took < 5  # transformers' own path: 64 s of retries here, then "couldn't connect"
    assert f"as a Hub id: cannot reach {endpoint}" in message
    assert "as a local path: no such directory" in message and "put the model on the run's volume" in message


def test_a_file_is_not_a_model_directory(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    message, _ = _source_error(str(f), monkeypatch, offline=True)
    assert message == (f"model.model_name_or_path: {str(f)!r} is a file; a model source is a directory holding "
                       "config.json and the weights, or a Hugging Face Hub id (org/name)")


def test_a_bad_model_source_is_a_recipe_error_in_the_termination_message(tmp_path, data_dir, kit):
    import subprocess
    import sys
    import time

    missing = str(tmp_path / "no-such-model")
    recipe = kit.write_recipe(tmp_path, "sft", missing, [str(data_dir / "sft.jsonl")], training={"max_steps": 1},
                              termination_message_path=str(tmp_path / "termination-log"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer", recipe], capture_output=True, text=True,
                          env=kit.trainer_env({"HF_HUB_OFFLINE": "1"}), timeout=120, cwd=kit.repo)
    took = time.monotonic() - start
    message = json.loads((tmp_path / "termination-log").read_text())
    assert proc.returncode == 2 and message["reason"] == "RecipeError", proc.stderr[-2000:]
    assert f"{missing!r} is not a model: as a local path: no such directory" in message["error"]
    assert took < 60, took  # imports and the data check; no download attempts
