"""Run one stage recipe.

    python -m alignment_trainer RECIPE.yaml
    accelerate launch --config_file trainer_image/accelerate/zero3.yaml -m alignment_trainer RECIPE.yaml

Exit status: 0 done (or already done), 2 bad recipe or data (fix the input; retrying will not
help), 1 anything else. Errors go to stderr as one line naming what to fix.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback

from .recipe import load_recipe


def run_recipe(recipe) -> dict | None:
    """Dispatch on recipe.method to the stage entry (imported lazily: each pulls in TRL)."""
    if recipe.method == "sft":
        from .stages import sft
        return sft.run(recipe)
    if recipe.method in ("dpo", "ipo", "simpo", "orpo"):
        from .stages import dpo
        return dpo.run(recipe)
    if recipe.method == "kto":
        from .stages import kto
        return kto.run(recipe)
    if recipe.method == "eval":
        if importlib.util.find_spec("alignment_trainer.stages.eval") is None:
            raise NotImplementedError("eval stage: see issue 4")
        from .stages import eval as eval_stage
        return eval_stage.run(recipe)
    raise ValueError(f"method: {recipe.method!r} has no trainer entry")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    from pydantic import ValidationError

    try:
        recipe = load_recipe(argv[0])
    except ValidationError as e:
        print(f"recipe {argv[0]}: {e}", file=sys.stderr)
        return 2
    try:
        run_recipe(recipe)
    except ValueError as e:  # recipe/data problems (DataError is a ValueError): say what, no traceback wall
        traceback.print_exc(limit=3)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
