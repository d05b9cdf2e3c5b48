"""Run one stage recipe.

    python -m alignment_trainer RECIPE.yaml
    accelerate launch --config_file trainer_image/accelerate/zero3.yaml -m alignment_trainer RECIPE.yaml

Exit status: 0 done (or already done); 2 the recipe, the data or the environment must be fixed
first (retrying will not help); 143 stopped by SIGTERM/SIGINT; 1 anything else (retryable).
On failure the last line on stderr is `error: ...`, and the recipe's termination_message_path
gets the compact JSON outcome both shells read (alignment_trainer.outcome).
"""

from __future__ import annotations

import errno
import importlib
import signal
import sys
import traceback

from . import outcome
from .launch import bound_threads
from .recipe import Recipe, read_recipe_file


class Interrupted(BaseException):
    """SIGTERM (a pod deleted, preempted or evicted; a local Ctrl-C forwarded): stop, resumable."""


def run_recipe(recipe) -> dict | None:
    """Dispatch to the method's stage entry (METHODS[method].entry; imported lazily: each pulls in TRL)."""
    stage = importlib.import_module(f".stages.{recipe.info.entry}", __package__)
    return stage.run(recipe)


def classify(exc: BaseException) -> dict:
    """The failure outcome for an exception: its reason, and the one line that says what is wrong."""
    from .data import DataError
    from .objectstore import ObjectStoreError, ObjectStoreUnreachable

    text = str(exc) or type(exc).__name__
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return outcome.failure(f"stopped by {text or 'a signal'}", "Interrupted")
    if isinstance(exc, DataError):
        return outcome.failure(text, "DataError")
    if isinstance(exc, (ObjectStoreError, ObjectStoreUnreachable)):
        return outcome.failure(text, type(exc).__name__)
    if _is_disk_full(exc):
        return outcome.failure(f"no space left on the device: {text}", "DiskFull")
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return outcome.failure(text, "OutOfMemory")
    if type(exc).__name__ == "DivergedError":
        return outcome.failure(text, "Diverged")
    if type(exc).__name__ == "WorldSizeMismatch":
        return outcome.failure(text, "WorldSizeMismatch")
    if type(exc).__name__ == "NotLearningError":
        return outcome.failure(text, outcome.NOT_LEARNING)
    if isinstance(exc, ValueError):  # the recipe asks for something that cannot work
        return outcome.failure(text, "RecipeError")
    return outcome.failure(f"{type(exc).__name__}: {text}", "Error")


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library (safetensors, torch.save) wraps it in its own exception."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _stop(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return outcome.FIX_INPUT
    from pydantic import ValidationError

    data = read_recipe_file(argv[0])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        result = outcome.failure(f"recipe {argv[0]}: {problems}", "RecipeError")
        print(f"error: {result['error']}", file=sys.stderr)
        outcome.write(data.get("termination_message_path"), result)
        return outcome.FIX_INPUT
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        threads = bound_threads()
        print(f"cpu threads per process: {threads}", file=sys.stderr, flush=True)
        from .objectstore import fetch_sources

        run_recipe(fetch_sources(recipe))
        return 0
    except (Exception, Interrupted, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure gets its outcome
        result = classify(e)
        if result["reason"] != "Interrupted":
            traceback.print_exc(limit=-4)  # the frames nearest the error, for the log only
        print(f"error: {result['error']}", file=sys.stderr, flush=True)
        outcome.write(recipe.termination_message_path, result)
        return result["exit_code"]
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
