#!/usr/bin/env python3
"""Write operator/alignment_operator/api/trl_fields.json: the TRL config fields each method's
stage builds (SFTConfig, DPOConfig, KTOConfig, CPOConfig, ORPOConfig) and the fields the
trainer sets itself, read from the installed TRL, so admission can check
`training.extraArgs` keys without torch:

    .venv/bin/python tools/gen_trl_fields.py

Run it after changing the TRL the trainer image pins; tests/unit/test_admission.py fails when
the committed file and the installed TRL disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "operator" / "alignment_operator" / "api" / "trl_fields.json"


def config_classes() -> dict[str, type]:
    """method -> the TRL config class its stage builds (the trainer's own dispatch)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl

    from alignment_trainer.recipe import METHODS
    from alignment_trainer.stages.dpo import trainer_classes

    out = {}
    for method, info in METHODS.items():
        if not info.trains:
            continue
        if info.entry == "sft":
            out[method] = trl.SFTConfig
        elif info.entry == "kto":
            out[method] = trl.KTOConfig
        elif info.entry == "reward":  # TRL's RewardConfig with DPO's truncation_mode
            from alignment_trainer.stages.reward import RewardConfig

            out[method] = RewardConfig
        elif info.entry == "dpo":
            out[method] = trainer_classes(method)[0]
        elif info.entry == "grpo":
            out[method] = trl.GRPOConfig
        else:
            raise SystemExit(f"tools/gen_trl_fields.py: no config class known for stage entry {info.entry!r}")
    return out


def generate() -> str:
    import transformers
    import trl

    from alignment_trainer.training import OWNED_FIELDS

    classes = config_classes()
    fields = {cls.__name__: {f.name for f in dataclasses.fields(cls) if f.init} for cls in classes.values()}
    helps = {}
    for cls in classes.values():
        for f in dataclasses.fields(cls):
            text = " ".join(str(f.metadata.get("help", "")).split())
            helps.setdefault(f.name, (text.split(". ")[0].rstrip(".") + ".") if text else f"TRL {cls.__name__}.{f.name}.")
    common = set.intersection(*fields.values())
    body = {
        "generated_by": "tools/gen_trl_fields.py",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "owned": sorted(OWNED_FIELDS),
        "methods": {m: cls.__name__ for m, cls in classes.items()},
        "common": sorted(common),
        "configs": {name: sorted(f - common) for name, f in sorted(fields.items())},
        "help": {name: helps[name] for name in sorted(set.union(*fields.values()) - set(OWNED_FIELDS))},
    }
    return json.dumps(body, indent=1) + "\n"


def main() -> int:
    OUT.write_text(generate())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
