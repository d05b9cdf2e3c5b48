"""Prompts the sampling stages read: every loader of a prompt set, and how long a prompt may be.

    load_prompts       grpo's (and eval.rewards') prompts with the reference columns its rules read
    load_prompt_set    eval's prompt set (eval.prompts): conversations only
    load_prompt_rows   generate's prompts with every other column, which travel with the completions
    load_generations   label's input: a generate stage's rows with their completions

A prompt is the conversation a row asks the policy to continue (prompt_turns): a `prompt` string or
turns, or `messages` whose trailing assistant turns are dropped. Weights subsample each source
(data.subsample, seeded by training.seed plus the source's index).
"""

from __future__ import annotations

from . import data, formats
from .data import DataError, describe, read_rows, subsample
from .recipe import DatasetArgs, Recipe
from .training import stage_label, truncate_prompt

# Columns of a prompt row that are the prompt itself (the rest travels with the completions).
PROMPT_COLUMNS = {"prompt", "messages", "completions", "stopped"}


def prompt_turns(row: dict, where: str) -> list[dict]:
    """The conversation a row asks the policy to continue."""
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    if isinstance(row.get("prompt"), list):
        return [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    if isinstance(row.get("messages"), list):
        turns = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if turns:
            return turns
    raise DataError(f"dataset {where}: a grpo row needs a `prompt` (text or turns) or `messages` with a user turn; "
                    f"got columns {sorted(row)}")


def load_prompts(recipe: Recipe, sources, columns: set[str]) -> list[dict]:
    """Rows {prompt: turns, <reference columns as text>} of every source (weights applied)."""
    out: list[dict] = []
    for k, args in enumerate(sources):
        where = describe(args)
        rows, _ = read_rows(args)
        for i, row in enumerate(subsample(rows, args.weight, recipe.training.seed + k)):
            missing = [c for c in sorted(columns) if c not in row]
            if missing:
                raise DataError(f"dataset {where}: row {i} lacks the reference column(s) {missing} a reward of "
                                f"{stage_label(recipe)} reads (grpo.rewards[].column); columns: {sorted(row)}")
            out.append({"prompt": prompt_turns(row, where),
                        **{c: None if row[c] is None else str(row[c]) for c in columns}})
    return out


def until_last_answer(messages: list[dict]) -> list[dict]:
    """A conversation cut before its last assistant reply."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def load_prompt_set(args: DatasetArgs, seed: int) -> list[list[dict]]:
    """A prompt set: a `prompt` column (text or turns ending with a user turn), or any layout
    data.py reads (chats are cut before their last reply, pairs give their prompt)."""
    where = data.describe(args)
    rows, lines = data.read_rows(args)
    if not rows:
        raise data.DataError(f"dataset {where}: is empty (no rows)")
    if "prompt" in rows[0] and not {"chosen", "completion", "output"} & set(rows[0]):
        prompts = []
        for i, row in enumerate(rows):
            try:
                prompts.append(formats.prompt(formats.field(row, "prompt")))
            except formats.RowError as e:
                at = f"line {lines[i]}" if lines else f"row {i}"
                raise data.DataError(f"dataset {where}: {at}: column 'prompt': {e.problem}") from None
    else:
        examples = data.parse_rows(rows, where, lines, split=args.split)
        prompts = [until_last_answer(ex["messages"]) if "messages" in ex else ex["prompt"] for ex in examples]
    return data.subsample([p for p in prompts if p], args.weight, seed)


def load_prompt_rows(recipe: Recipe) -> list[dict]:
    """{prompt: turns, <other columns>} for every prompt of the mixture (weights applied, in order)."""
    rows: list[dict] = []
    for k, args in enumerate(recipe.datasets):
        where = describe(args)
        read, _ = read_rows(args)
        for row in subsample(read, args.weight, recipe.training.seed + k):
            if args.columns:  # datasets[].columns: only these travel with the completions
                missing = [c for c in args.columns if c not in row]
                if missing:
                    raise DataError(f"dataset {where}: columns {missing} selected but not found; columns: {sorted(row)}")
                row = {c: row[c] for c in args.columns}
            rows.append({**{c: v for c, v in row.items() if c not in PROMPT_COLUMNS},
                         "prompt": prompt_turns(row, where)})
    return rows[:recipe.generate.max_prompts] if recipe.generate.max_prompts else rows


def load_generations(recipe: Recipe, columns: set[str]) -> list[dict]:
    """{prompt: turns, completions: [text], stopped: [bool | None], <reference columns as text>} per
    generate row (stopped None: the row says nothing about it)."""
    rows: list[dict] = []
    for k, args in enumerate(recipe.datasets):
        where = describe(args)
        read, _ = read_rows(args)
        for i, row in enumerate(subsample(read, args.weight, recipe.training.seed + k)):
            done = row.get("completions")
            if not isinstance(done, list) or not all(isinstance(c, str) for c in done):
                raise DataError(f"dataset {where}: row {i}: column 'completions' must be a list of texts (a generate "
                                f"stage's output: name it in datasets[].stage); columns: {sorted(row)}")
            missing = sorted(c for c in columns if c not in row)
            if missing:
                raise DataError(f"dataset {where}: row {i} lacks the reference column(s) {missing} a reward of "
                                f"{stage_label(recipe)} reads (label.rewards[].column); columns: {sorted(row)}")
            stopped = row.get("stopped")
            if stopped is None:
                stopped = [None] * len(done)
            elif (not isinstance(stopped, list) or len(stopped) != len(done)
                  or not all(isinstance(x, bool) for x in stopped)):
                raise DataError(f"dataset {where}: row {i}: column 'stopped' must be a list of booleans, one per "
                                f"completion ({len(done)}), as a generate stage writes it; got {stopped!r}")
            rows.append({"prompt": prompt_turns(row, where), "completions": done, "stopped": stopped,
                         **{c: None if row[c] is None else str(row[c]) for c in columns}})
    return rows


def question(prompt: list[dict]) -> str:
    """A prompt as the judge reads it: the user's text, or the conversation so far."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------- lengths

def prompt_limit(recipe: Recipe) -> int:
    """The most prompt tokens: training.max_prompt_length, and room for the longest completion in max_length."""
    t, g = recipe.training, recipe.grpo
    room = t.max_length - g.max_completion_length
    if room <= 0:
        raise ValueError(f"training.max_length: {t.max_length} leaves no room for a prompt before "
                         f"grpo.max_completion_length {g.max_completion_length} tokens; raise max_length above it or "
                         "lower max_completion_length")
    return min(room, t.max_prompt_length or room)


def cut_prompts(rows: list[dict], tokenizer, limit: int) -> list[dict]:
    return [{**r, "prompt": truncate_prompt(r["prompt"], tokenizer, limit)} for r in rows]
