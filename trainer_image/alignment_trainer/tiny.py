"""Tiny random chat models for tests, CI and the README's first run.

    python -m alignment_trainer.tiny OUT_DIR [CORPUS_FILE ...]     # or: alignctl tiny-model OUT_DIR

writes a randomly initialised Llama (or Qwen2) of ~1-3M parameters with a byte-level BPE
tokenizer trained on the given text, ChatML special tokens, a ChatML chat template and a
generation_config whose eos is <|im_end|>: a directory that `from_pretrained` loads like any
Hub checkpoint, so the trainer exercises its real loading path on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# ChatML as Qwen2 ships it, without a default system prompt. An assistant turn ends with
# <|im_end|>, which is therefore the eos the model learns to emit.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
ARCHS = ("llama", "qwen2")

# Default size: 4 layers of width 128 with a 2048-token vocabulary is ~1.1M parameters; trains
# a few hundred steps a minute on two CPU cores.
DEFAULT_SIZE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)


def _strings(obj) -> list[str]:
    """Every string inside a parsed JSON row (message contents, prompts, completions)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def read_corpus(corpus: list[str | Path]) -> list[str]:
    """Texts from strings and files; JSON/JSONL files contribute every string they hold."""
    texts: list[str] = []
    for item in corpus:
        path = Path(item) if isinstance(item, Path) or (len(str(item)) < 4096 and Path(str(item)).is_file()) else None
        if path is None:
            texts.append(str(item))
        elif path.suffix == ".jsonl":
            texts += [s for line in path.read_text().splitlines() if line.strip() for s in _strings(json.loads(line))]
        elif path.suffix == ".json":
            texts += _strings(json.loads(path.read_text()))
        else:
            texts.append(path.read_text())
    # The chat markup itself, so role names are single tokens-ish and never unknown bytes.
    texts += ["system\n", "user\n", "assistant\n"] * 8
    return texts


def default_corpus() -> list[Path]:
    """The example datasets under examples/data/ when running from a checkout."""
    data = Path(__file__).resolve().parents[2] / "examples" / "data"
    return sorted(p for p in data.glob("*.jsonl")) if data.is_dir() else []


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: every byte is a token, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START], chat_template=CHATML_TEMPLATE, model_max_length=2048,
        clean_up_tokenization_spaces=False)


def make_tiny_model(out_dir: str | Path, corpus: list[str | Path] | None = None, vocab_size: int = 2048,
                    arch: str = "llama", seed: int = 0, **size) -> Path:
    """Write a tiny random chat model to `out_dir` and return the path.

    corpus: texts and/or files (JSONL/JSON/plain) to train the tokenizer on; default: the
    example datasets. size: overrides of DEFAULT_SIZE (hidden_size, num_hidden_layers, ...).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
    corpus = list(corpus) if corpus is not None else default_corpus()
    if not corpus:
        raise ValueError("corpus: no text to train the tokenizer on (and no examples/data/*.jsonl found)")
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(read_corpus(corpus), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    dims = {**DEFAULT_SIZE, **size}
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[PAD], **dims)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Greedy by default, stops on the end-of-turn token: the contract the trainer keeps.
    model.generation_config = GenerationConfig(
        eos_token_id=ids[IM_END], pad_token_id=ids[PAD], do_sample=False, max_new_tokens=64)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tiny-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("corpus", nargs="*", help="text/JSONL files; default: examples/data/*.jsonl")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    args = parser.parse_args(argv)
    out = make_tiny_model(args.out_dir, args.corpus or None, vocab_size=args.vocab_size, arch=args.arch)
    n = sum(p.stat().st_size for p in out.glob("*.safetensors")) // 4
    print(f"tiny {args.arch} model (~{n / 1e6:.1f}M parameters) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
