"""Which checkpoints a stage's output directory holds. Torch-free: the local runner uses it too."""

from __future__ import annotations

import re
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint-N/, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path, (path / "trainer_state.json").is_file()))
    return sorted(found)


def newest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest COMPLETE checkpoint (a killed save leaves no trainer_state.json)."""
    complete = [path for _, path, ok in checkpoints(output_dir) if ok]
    return str(complete[-1]) if complete else None
