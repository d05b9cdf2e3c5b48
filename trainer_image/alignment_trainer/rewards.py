"""Rewards: what grpo trains on, label scores with and eval.rewards measures (recipe RewardArgs).

Each reward is a callable TRL's GRPOTrainer takes (prompts, completions, **reference columns) ->
one float per completion, named for its metrics (rewards/<name>/mean):
    exact_match, contains, regex   a rule against a reference column of the prompt's row
    format                         the completion matches a pattern
    reward_model                   a reward stage's final/ (reward_model.RewardModel)
    judge                          an LLM judge's 1-10 grade (judge_prompts.SINGLE) divided by 10
recipe weights sum them (total_reward). A reward that raises fails the stage with RewardError (a
RecipeError, exit 2) naming the stage, the reward and what to fix.
"""

from __future__ import annotations

import logging
import re

from .judge_prompts import SINGLE, parse_rating
from .prompts import question
from .recipe import Recipe, RewardArgs
from .reward_model import RewardModel
from .training import stage_label

log = logging.getLogger("alignment_trainer")

# Kinds that read no reference column of the prompt's row
NO_COLUMN = ("format", "reward_model", "judge")


class RewardError(ValueError):
    """A reward function raised: the recipe (its rewards or the prompts' reference column) must be fixed."""


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def _rule(args: RewardArgs):
    pattern = re.compile(args.pattern) if args.pattern else None

    def score(text: str, ref: str | None) -> float:
        if args.kind == "format":
            return float(pattern.search(text) is not None)
        if ref is None:
            raise ValueError(f"the row's {args.column!r} is empty (null); every prompt needs a reference answer")
        if args.kind == "exact_match":
            return float(text.strip() == ref.strip())
        if args.kind == "contains":
            return float(ref.strip() in text)
        match = pattern.search(text)  # regex
        if match is None:
            return 0.0
        return float((match.group(1) if match.groups() else match.group(0)).strip() == ref.strip())

    def reward(prompts, completions, **kwargs):
        refs = kwargs.get(args.column) if args.kind != "format" else [None] * len(completions)
        if refs is None:
            raise ValueError(f"no column {args.column!r} reaches the reward (columns: {sorted(kwargs)})")
        return [score(_text(c), r) for c, r in zip(completions, refs)]

    return reward


def _reward_model(args: RewardArgs):
    scorer = RewardModel(args.model, "rewards[].model")

    def reward(prompts, completions, **kwargs):  # one batch: the prompts of one reward call
        return scorer.score([p + [{"role": "assistant", "content": _text(c)}] for p, c in zip(prompts, completions)])

    return reward


JUDGE_CONCURRENCY = 8  # judge requests in flight at once (an OpenAI-compatible server batches them)


def _judge(args: RewardArgs, where: str):
    """An LLM judge's 1-10 grade of each answer (FastChat's single-answer prompt), divided by 10,
    JUDGE_CONCURRENCY requests at a time; an answer without a grade scores 0 (logged)."""
    import os

    from .judge import Judge

    if not os.environ.get(args.judge.api_key_env):
        raise ValueError(f"{where}: environment variable {args.judge.api_key_env} (the judge's API key) is not set; "
                         "on a cluster give the reward's judge an apiKeySecretRef, locally export the variable")
    judge = Judge(args.judge)

    def grade(p, c) -> float | None:
        rating = parse_rating(judge.complete(SINGLE[0], SINGLE[1].format(question_1=question(p), answer_1=_text(c))))
        if rating is None:
            log.warning("%s: the judge gave no [[rating]] for an answer; it scores 0", where)
        return None if rating is None else rating / 10

    def reward(prompts, completions, **kwargs):
        from concurrent.futures import ThreadPoolExecutor

        from .live import note_reward_samples

        with ThreadPoolExecutor(max_workers=JUDGE_CONCURRENCY) as pool:
            graded = list(pool.map(grade, prompts, completions))
        note_reward_samples(sum(g is None for g in graded), len(graded))  # live.LearningGuard reads the share
        return [0.0 if g is None else g for g in graded]

    return reward


def build_rewards(recipe: Recipe, rewards: list[RewardArgs] | None = None, section: str = "grpo") -> list:
    """One callable per reward (recipe.grpo.rewards, or `rewards` of recipe.<section>: the label
    stage's), named for TRL's metrics (rewards/<name>/mean); an exception inside becomes a
    RewardError naming the stage and <section>.rewards[i]."""
    funcs = []
    from .judge import JudgeError

    for i, args in enumerate(recipe.grpo.rewards if rewards is None else rewards):
        where = f"{stage_label(recipe)}: {section}.rewards[{i}] ({args.kind})"
        inner = (_reward_model(args) if args.kind == "reward_model" else _judge(args, where) if args.kind == "judge"
                 else _rule(args))
        name = args.kind if args.kind in NO_COLUMN else f"{args.kind}_{args.column}"
        if any(f.__name__ == name for f in funcs):
            name = f"{name}_{i}"

        def wrapped(prompts, completions, _inner=inner, _i=i, _args=args, _where=where, **kwargs):
            try:
                return _inner(prompts=prompts, completions=completions, **kwargs)
            except JudgeError as e:  # unreachable, timing out, refusing: retryable once the endpoint is fixed
                raise JudgeError(f"{_where}: {str(e).removeprefix('eval.judge: ')}; check {section}.rewards[{_i}]"
                                 ".judge (baseUrl, model, its API key) and that the endpoint answers") from e
            except Exception as e:  # noqa: BLE001 - any failure of a reward is the recipe's to fix
                fix = (f"check the model {_args.model}" if _args.kind == "reward_model"
                       else f"check its pattern/column and the prompts' {_args.column!r} values")
                raise RewardError(f"{stage_label(recipe)}: {section}.rewards[{_i}] ({_args.kind}) raised "
                                  f"{type(e).__name__}: {e}; {fix}") from e

        wrapped.__name__ = name
        funcs.append(wrapped)
    return funcs


def total_reward(funcs, weights, prompts, completions, columns: dict) -> list[float]:
    parts = [f(prompts=prompts, completions=completions, **columns) for f in funcs]
    return [sum(w * p[j] for w, p in zip(weights, parts)) for j in range(len(completions))]


def reference_columns(rewards: list[RewardArgs]) -> set[str]:
    """The prompt rows' columns the rule rewards compare against."""
    return {r.column for r in rewards if r.kind not in NO_COLUMN}
