"""The local paths a run names, checked before anything starts: a typo'd model directory or data
file fails in a second with what to fix, not a minute later inside a stage (where a path that does
not exist reads as a Hub id and becomes a download).

A source is read as a local path when it exists, when it cannot be a Hub id (absolute, ./, ../, ~,
more than one '/', a data file's extension) or when its first directory exists here (runs/tiny-modle
beside runs/); anything else is a Hub id, which this does not check (no network is needed).
`strict` (run --local): every such path must exist here. Otherwise (validate, a file that may be
meant for a cluster's volume) only those that cannot be a Hub id and whose parent directory is here:
a typo in something that is (a Hub-id-shaped one, such as a model directory not built yet, is a note).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel

from ..api import AlignmentRun, DatasetSpec

DATA_SUFFIXES = re.compile(r"\.(jsonl?|parquet|csv|tsv|txt|arrow)(\.(gz|bz2|xz|zst))?$", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def sources(run: AlignmentRun) -> Iterator[tuple[str, str, str]]:
    """(field path, source, kind) of the model and of every dataset the run names by source."""
    yield "spec.model.source", run.spec.model.source, "model"

    def walk(node, at: str):
        if isinstance(node, DatasetSpec):
            if node.source:
                yield f"{at}.source", node.source, "dataset"
        elif isinstance(node, BaseModel):
            for name, info in type(node).model_fields.items():
                yield from walk(getattr(node, name), f"{at}.{info.alias or name}")
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                yield from walk(item, f"{at}[{i}]")

    for i, stage in enumerate(run.spec.stages):
        yield from walk(stage, f"spec.stages[{i}]")


def unambiguous_path(source: str, kind: str) -> bool:
    """Nothing but a local path can be meant (never a Hub id)."""
    return (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or not HUB_ID.match(source)
            or kind == "dataset" and DATA_SUFFIXES.search(source) is not None)


def reads_as_path(source: str, kind: str, base: Path) -> bool:
    return unambiguous_path(source, kind) or "/" in source and (base / source.split("/")[0]).is_dir()


def _near(path: Path) -> str:
    """What is beside a missing path: the close names, or what its directory holds."""
    parent = path.parent
    if not parent.is_dir():
        return f"{parent} does not exist either"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith("."))
    close = difflib.get_close_matches(path.name, [n.rstrip("/") for n in names], n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(str(parent / c) for c in close) + "?"
    return f"{parent}/ holds: {', '.join(names[:8]) + (' ...' if len(names) > 8 else '') if names else 'nothing'}"


def path_problems(run: AlignmentRun, base: Path | None = None, strict: bool = True,
                  notes: list[str] | None = None) -> list[str]:
    """One line per missing local path: the field, the value, where it looked and what to do. Not
    strict, a missing one that could still be a Hub id or a directory not built yet (runs/sums-model
    beside runs/tiny-model) goes to `notes` instead, when given."""
    base = Path.cwd() if base is None else Path(base)
    mount = run.spec.storage.mount_path.rstrip("/") + "/"
    problems = []
    for at, source, kind in sources(run):
        if source.startswith("s3://") or not reads_as_path(source, kind, base):
            continue  # an object store's (fetched by the stage) or a Hub id
        path = (base / Path(source).expanduser()).resolve()
        if path.exists():
            if kind == "model" and path.is_file():
                problems.append(f"{at}: {source!r} is a file; a model is a directory holding config.json and "
                                "the weights")
            continue
        if not strict and (source.startswith(mount) or not path.parent.is_dir()):
            continue  # on the run's volume, or nothing of it here: not this machine's to check
        fix = (f"fix the path, give a Hub id (org/name), or build a tiny random model there for a CPU run "
               f"(`alignctl tiny-model {source}`)" if kind == "model"
               else "fix the path, or give a Hub dataset id (org/name)")
        line = f"{at}: {source!r} does not exist ({path}; {_near(path)}); {fix}"
        if not strict and not unambiguous_path(source, kind):
            if notes is not None:
                notes.append(line + "; run --local refuses it until it exists")
            continue
        problems.append(line)
    return problems
