"""A stage's outcome, as both shells read it: the compact JSON the trainer writes to its
termination message path when it ends (Kubernetes' /dev/termination-log in a pod; a file in
the stage's directory for `alignctl run --local`).

    success:  {"method": "dpo", "checkpoint": ".../final", "global_step": 120, "train_loss": 0.41, ...}
    failure:  {"error": "dataset x.jsonl row 3: ...", "reason": "DataError", "exit_code": 2,
               "fix": "fix the input; retrying will not help"}

`error` comes first and is the trainer's own line naming what is wrong (file, row, column);
the whole message stays under 4 KiB, the most Kubernetes keeps. Exit codes: 0 done, 2 the input
or the environment must be fixed before a retry can help (the podFailurePolicy fails the stage
at once on it), anything else retryable (a retry resumes from the newest checkpoint).

Torch-free: the operator imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TERMINATION_MESSAGE_LIMIT = 4096 - 96  # Kubernetes keeps 4 KiB; stay clearly below it
FIX_INPUT = 2        # exit code: fix the recipe, the data or the environment first
RETRYABLE = 1        # exit code: something went wrong that a retry may not meet again
INTERRUPTED = 143    # exit code after SIGTERM/SIGINT (128 + 15): a retry resumes

NOT_LEARNING = "NotLearning"  # a stage whose guards (recipe.GuardArgs) make learning nothing fatal

# reason -> (exit code, what to do). The reason names the kind of failure in status and events.
REASONS: dict[str, tuple[int, str]] = {
    "RecipeError": (FIX_INPUT, "fix the stage's settings; retrying will not help"),
    "DataError": (FIX_INPUT, "fix the dataset named here (or allow a few bad rows with maxInvalidFraction); "
                             "retrying will not help"),
    "DiskFull": (FIX_INPUT, "free space on the run's volume or give it more, then retry: it resumes from "
                            "the newest complete checkpoint"),
    "OutOfMemory": (FIX_INPUT, "lower perDeviceBatchSize or maxLength, turn on gradientCheckpointing, or use "
                               "more GPUs / deepspeed-zero3, then retry"),
    "Diverged": (FIX_INPUT, "the loss or gradient is not finite: lower the learning rate or check the data"),
    "WorldSizeMismatch": (FIX_INPUT, "the stage's processes formed another world than rendered (nodes x processes "
                                     "per node): check its launch command and that every node joined"),
    "ObjectStoreError": (FIX_INPUT, "fix the s3:// URI, the bucket's contents or the credentials (objectStore."
                                    "credentialsSecretName, or the service account's access); retrying will not help"),
    "ObjectStoreUnreachable": (RETRYABLE, "the object store did not answer: check objectStore.endpointUrl and that "
                                          "the store is up; a retry fetches or exports again"),
    NOT_LEARNING: (FIX_INPUT, "training learns nothing (the stage's guards make that fatal): check the reward, "
                               "the data and the learning rate"),
    "Interrupted": (INTERRUPTED, "the stage was stopped; a retry resumes from the newest checkpoint"),
    "Error": (RETRYABLE, "see the stage's log; a retry resumes from the newest checkpoint"),
}


def failure(error: str, reason: str = "Error", **extra: Any) -> dict[str, Any]:
    """The failure outcome; `error` is one line saying what is wrong."""
    code, fix = REASONS[reason]
    return {"error": " ".join(error.split()), "reason": reason, "exit_code": code, "fix": fix, **extra}


def reason_of(message: str | None) -> str | None:
    """The failure reason a `describe` message starts with ("DataError (exit code 2; ...): ..."), or None."""
    head = (message or "").split(" (exit code", 1)[0]
    return head if head in REASONS and head != "Error" else None


def encode(outcome: dict[str, Any]) -> str:
    """Compact JSON under TERMINATION_MESSAGE_LIMIT bytes.

    A failure keeps `error` (cut in the middle, keeping its start and its end) and `reason`; a
    result drops its least important fields first.
    """
    keep = {k: v for k, v in outcome.items() if v is not None}
    text = _dumps(keep)
    if "error" in keep:
        for key in [k for k in keep if k not in ("error", "reason", "exit_code")]:
            if _fits(text):
                return text
            keep.pop(key)
            text = _dumps(keep)
        while not _fits(text):
            error = keep["error"]
            over = len(text.encode()) - TERMINATION_MESSAGE_LIMIT + 8
            cut = max(len(error) - over, 40)
            keep["error"] = error[:cut // 2] + " … " + error[len(error) - cut // 2:]
            text = _dumps(keep)
        return text
    for key in [k for k in keep if k not in ("checkpoint", "global_step", "method", "train_loss")]:
        if _fits(text):
            break
        keep.pop(key)
        text = _dumps(keep)
    if not _fits(text):  # a pathological checkpoint path
        text = _dumps(failure("result too large for a termination message; see result.json"))
    return text


def decode(text: str | None) -> dict[str, Any] | None:
    """The outcome in a termination message, or None when it holds none (empty, or a log tail)."""
    text = (text or "").strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def describe(outcome: dict[str, Any], exit_code: int | None = None) -> str:
    """One status message for a failure; it ends with the trainer's own line."""
    reason = outcome.get("reason", "Error")
    code = exit_code if exit_code is not None else outcome.get("exit_code")
    fix = outcome.get("fix")
    head = f"{reason} (exit code {code}{f'; {fix}' if fix else ''})"
    return f"{head}: {outcome.get('error', 'no error message')}"


def write(path: str | Path | None, outcome: dict[str, Any]) -> None:
    """Write the outcome where the shell reads it. With several processes in one pod, the first
    real failure wins: a rank stopped because another one failed ("Interrupted") never
    overwrites that rank's error."""
    if not path:
        return
    path = Path(path)
    if outcome.get("reason") == "Interrupted" and path.is_file():
        present = decode(path.read_text(errors="replace"))
        if present and "error" in present:
            return
    try:
        path.write_text(encode(outcome))
    except OSError:
        pass  # a full disk may refuse even this; the log still has the error


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _fits(text: str) -> bool:
    return len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
