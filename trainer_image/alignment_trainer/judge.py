"""Pairwise LLM judge over an OpenAI-compatible chat completions endpoint (MT-Bench style).

Each prompt is judged twice, answers swapped, so a judge that favours the first (or second)
position cancels out: a win in both orders counts 1, a win and a loss 0.5 (like a tie), a
loss in both 0. Standard library only (urllib); the API key is read from the environment,
sent in the Authorization header and never logged, printed or written anywhere.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from .judge_prompts import SYSTEM, USER, parse_verdict
from .recipe import JudgeArgs

class JudgeError(RuntimeError):
    """The judge endpoint could not be used (its message never contains the API key)."""


class Judge:
    def __init__(self, args: JudgeArgs, timeout: float | None = None, retries: int | None = None):
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ValueError(f"eval.judge: environment variable {args.api_key_env} (the judge's API key) is not set")
        self.args, self._key = args, key
        self.timeout = args.timeout_seconds if timeout is None else timeout
        self.retries = args.max_retries if retries is None else retries
        self.url = args.base_url.rstrip("/") + "/chat/completions"
        self.reported_models: set[str] = set()  # the `model` the endpoint says answered

    def provenance(self) -> dict:
        """What a judged result must name to be reproducible (never the key)."""
        return {"judge_model": self.args.model, "judge_base_url": self.args.base_url,
                "judge_reported_model": ", ".join(sorted(self.reported_models)) or None}

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***")

    def complete(self, system: str, user: str, max_tokens: int = 512) -> str:
        """One chat completion (temperature 0); retries transient failures with backoff."""
        body = json.dumps({"model": self.args.model, "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
        last = ""
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read())
                text = data["choices"][0]["message"]["content"] or ""
                if isinstance(data.get("model"), str):
                    self.reported_models.add(data["model"])
                return text
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                last = f"HTTP {e.code} from {self.url}: {self._scrub(detail)}"
                if e.code in (400, 401, 403, 404):  # will not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or "timed out" in str(e):
                    last = f"no answer from {self.url} within {self.timeout:g} s (eval.judge.timeout_seconds)"
                else:
                    last = f"cannot reach {self.url}: {self._scrub(str(e))}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                last = f"unexpected answer from {self.url}: {type(e).__name__} {self._scrub(str(e))}"
            time.sleep(min(2 ** attempt, 10) if attempt + 1 < self.retries else 0)
        raise JudgeError(f"eval.judge: {last} (after {attempt + 1} tries)")

    def verdict(self, question: str, a: str, b: str) -> str | None:
        return parse_verdict(self.complete(SYSTEM, USER.format(question=question, a=a, b=b)))


def win_rate(judge: Judge, items: list[dict], progress=None) -> tuple[dict[str, float], list[dict]]:
    """Judge `model` against `reference` answers for each item {question, model, reference}.

    Returns (metrics, per-item records). judge_win_rate counts a win in both orders as 1, a
    split or a tie as 0.5; judge_consistency is the fraction of prompts whose two verdicts agree.
    """
    records, score, wins, losses, ties, invalid, consistent = [], 0.0, 0, 0, 0, 0, 0
    for i, item in enumerate(items):
        first = judge.verdict(item["question"], item["model"], item["reference"])   # model is A
        second = judge.verdict(item["question"], item["reference"], item["model"])  # model is B
        outcomes = [{"A": 1.0, "B": 0.0, "tie": 0.5}.get(first), {"A": 0.0, "B": 1.0, "tie": 0.5}.get(second)]
        valid = [o for o in outcomes if o is not None]
        invalid += len(outcomes) - len(valid)
        item_score = sum(valid) / len(valid) if valid else 0.5
        score += item_score
        wins += item_score > 0.5
        losses += item_score < 0.5
        ties += item_score == 0.5
        consistent += len(valid) == 2 and valid[0] == valid[1]
        records.append({"index": i, "verdict_model_first": first, "verdict_model_second": second,
                        "score": item_score})
        if progress:
            progress(i + 1, len(items))
    n = max(len(items), 1)
    metrics = {"judge_win_rate": score / n, "judge_wins": wins, "judge_losses": losses, "judge_ties": ties,
               "judge_invalid": invalid, "judge_consistency": consistent / n, "judge_prompts": len(items)}
    if items and invalid == 2 * len(items):
        raise JudgeError(f"eval.judge: {judge.args.model} gave no parseable verdict ([[A]], [[B]] or [[C]]) "
                         f"in {invalid} answers")
    return metrics, records
