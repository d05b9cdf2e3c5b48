"""What a stage will train on, before any GPU is spent (`alignctl inspect RUN.yaml` runs this per stage).

    python -m alignment_trainer.inspect_data RECIPE.yaml [--samples 3]

The data is read exactly as the stage reads it (data.load_stage_data: layouts, checks, mixture
weights, the test split), with the stage's tokenizer (model.load_tokenizer: its chat template and
end-of-turn token) and the stage's own tokenization (tokens.ChatEncoder: the tokens a loss
covers; training.truncate_prompt: prompts kept at their end to max_prompt_length). It prints:
- rows per source, and the invalid ones (skipped within datasets[].maxInvalidFraction, else the
  stage fails on the first);
- token-length percentiles of what the stage trains on;
- how many rows the lengths cut, and how: prompts longer than max_prompt_length lose their oldest
  turns, then the start of the last user message; sequences longer than max_length keep their start
  (TRL's truncation), so a reply loses its end, and an SFT row left with no trained token is dropped;
- a few rows rendered through the chat template, the trained tokens between ⟦ and ⟧.
A grpo stage: its prompts with the reference columns its rule rewards read, their token lengths, how
many its prompt limit cuts, a few rendered with their reference answers.
Exit 0, or 2 with the data's error (the stage would fail the same way).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from .data import DataError, describe, load_examples, load_stage_data
from .recipe import METHODS, load_recipe

OPEN, CLOSE = "⟦", "⟧"


def percentiles(values: list[int]) -> str:
    if not values:
        return "no rows"
    v = sorted(values)
    at = lambda q: v[max(0, math.ceil(q * len(v)) - 1)]  # noqa: E731  (nearest rank)
    return f"p50 {at(0.5)}  p90 {at(0.9)}  p99 {at(0.99)}  max {v[-1]}  ({len(v)} rows)"


def marked(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The text of `ids`, the runs of trained tokens (mask 1) between ⟦ and ⟧."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            text = tokenizer.decode(ids[start:k])
            out.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = k
    return "".join(out)


class _Skipped(logging.Handler):
    """data.parse_rows' "skipped N of M malformed rows" warnings, kept as numbers."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple] = []

    def emit(self, record):
        if str(record.msg).startswith("dataset %s: skipped"):
            self.found.append(record.args)


def invalid_rows(recipe) -> list[str]:
    """Per source: its rows, and how many are invalid (each read allowing every row to be)."""
    lines = []
    handler = _Skipped()
    logger = logging.getLogger("alignment_trainer")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # counted here, not printed
    try:
        for args in recipe.datasets + recipe.test_datasets:
            handler.found.clear()
            kept = load_examples(args.model_copy(update={"max_invalid_fraction": 1.0}))
            bad = handler.found[0] if handler.found else None
            line = f"  {describe(args)}: {len(kept)} examples"
            if bad:
                verdict = ("skipped" if bad[1] <= args.max_invalid_fraction * bad[2]
                           else f"the stage FAILS (maxInvalidFraction {args.max_invalid_fraction})")
                line += f"; {bad[1]} of {bad[2]} rows invalid, {verdict}; first: {bad[4]}"
            lines.append(line)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return lines


def inspect(recipe, samples: int):
    """The report's lines, as they are known (what was read before a failing step is printed)."""
    from .model import load_tokenizer
    from .tokens import ChatEncoder
    from .training import _prompt_length, truncate_prompt

    t = recipe.training
    yield f"stage data ({recipe.method}):"
    yield from invalid_rows(recipe)
    data = load_stage_data(recipe)
    tokenizer = load_tokenizer(recipe.model)
    encode = ChatEncoder(tokenizer)
    for split, rows in data.items():
        lengths, trained, shown = [], [], []
        prompt_cut = seq_cut = dropped = lost = 0
        completion = next((c for c in ("chosen", "completion", "messages") if c in rows.column_names), None)
        for i, row in enumerate(rows):
            prompt = row.get("prompt") or []
            if prompt and t.max_prompt_length and _prompt_length(tokenizer, prompt) > t.max_prompt_length:
                prompt_cut += 1
                prompt = truncate_prompt(prompt, tokenizer, t.max_prompt_length)
            replies = [row["chosen"], row["rejected"]] if "chosen" in row else [row[completion]]
            for reply in replies:
                ids, mask = encode(prompt + reply, scored_from=len(prompt)) if prompt else encode(reply)
                lengths.append(len(ids))
                trained.append(sum(mask))
                if t.max_length and len(ids) > t.max_length:
                    seq_cut += 1
                    lost += sum(mask[t.max_length:])
                    dropped += completion == "messages" and not any(mask[:t.max_length])
                if i < samples:
                    label = "" if len(replies) == 1 else " chosen" if reply is replies[0] else " rejected"
                    shown.append((f"sample {i + 1}{label}", marked(tokenizer, ids, mask)))
        pairs = " (chosen and rejected counted apart)" if "chosen" in rows.column_names else ""
        out = [f"{split}: {len(rows)} rows{pairs}",
               f"  tokens per sequence:   {percentiles(lengths)}",
                f"  {'trained' if METHODS[recipe.method].trains else 'scored'} tokens:        {percentiles(trained)}"]
        if t.max_prompt_length:
            out.append(f"  prompts cut to max_prompt_length {t.max_prompt_length} (oldest turns first, "
                       f"keeping the end): {prompt_cut}")
        if t.max_length:
            out.append(f"  sequences cut to max_length {t.max_length} (keeping the start: the reply's end goes): "
                       f"{seq_cut}, {lost} trained tokens lost" + (f", {dropped} rows left with nothing to train "
                                                                  "(dropped)" if completion == "messages" else ""))
        for label, text in shown:
            out += [f"  --- {split} {label} ---", *("    " + line for line in text.splitlines())]
        yield from out


def inspect_prompts(recipe, samples: int):
    """A grpo stage: its prompts read as the stage reads them (with the reference columns its rule
    rewards compare against), their lengths, how many its prompt limit cuts, a few rendered."""
    from .model import load_tokenizer
    from .prompts import load_prompts, prompt_limit
    from .rewards import reference_columns
    from .training import _prompt_length, truncate_prompt

    columns = reference_columns(recipe.grpo.rewards)
    yield f"stage prompts ({recipe.method}; reference column(s) the rules read: {', '.join(sorted(columns)) or 'none'}):"
    tokenizer = load_tokenizer(recipe.model)
    limit = prompt_limit(recipe)
    for split, sources in (("train", recipe.datasets), ("test", recipe.test_datasets)):
        if not sources:
            continue
        rows = load_prompts(recipe, sources, columns)
        lengths = [_prompt_length(tokenizer, r["prompt"]) for r in rows]
        yield f"{split}: {len(rows)} prompts"
        yield f"  prompt tokens:         {percentiles(lengths)}"
        yield (f"  prompts cut to {limit} tokens (max_prompt_length, and max_length less max_completion_length; "
               f"oldest turns first, keeping the end): {sum(n > limit for n in lengths)}")
        for i, row in enumerate(rows[:samples]):
            text = tokenizer.apply_chat_template(truncate_prompt(row["prompt"], tokenizer, limit), tokenize=False,
                                                 add_generation_prompt=True)
            refs = "; ".join(f"{c} = {row[c]!r}" for c in sorted(columns))
            yield f"  --- {split} sample {i + 1}{f' ({refs})' if refs else ''} ---"
            yield from ("    " + line for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignment_trainer.inspect_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--samples", type=int, default=2, help="rows rendered per split (default 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    recipe = load_recipe(args.recipe)
    if recipe.method == "grpo":
        lines = inspect_prompts(recipe, args.samples)
    elif METHODS[recipe.method].data in ("chat", "pairwise", "unpaired"):
        lines = inspect(recipe, args.samples)
    else:
        print(f"method {recipe.method} reads {METHODS[recipe.method].data}: not inspected (its data is made "
              "or read by the stage itself)")
        return 0
    try:
        for line in lines:
            print(line, flush=True)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
