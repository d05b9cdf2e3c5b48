"""Reading AlignmentRun manifests from files: the one reader `alignctl validate`, `render` and
`run --local` share."""

from __future__ import annotations

from pathlib import Path

import yaml

from .run import KIND, AlignmentRun, RunInvalid, parse_run


def run_documents(path: str | Path) -> list[dict]:
    """The AlignmentRun documents of a YAML file, unvalidated; none at all is an error naming the file."""
    path = Path(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise RunInvalid([f"cannot read: {e}"], str(path)) from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not runs:
        raise RunInvalid([f"no {KIND} document found"], str(path))
    return runs


def load_run(path: str | Path) -> AlignmentRun:
    """The one AlignmentRun in a YAML file, validated as the API server would."""
    runs = run_documents(path)
    if len(runs) != 1:
        raise RunInvalid([f"expected one AlignmentRun document, found {len(runs)}"], str(path))
    return parse_run(runs[0], str(path))
