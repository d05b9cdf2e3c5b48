"""One tiny model for every end-to-end test, built once per session as the README builds it
(`alignctl tiny-model`, ~15 s of CPU): the tests only read it (runs copy nothing into it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="session")
def tiny_model_build(tmp_path_factory) -> SimpleNamespace:
    """The model's directory and what `alignctl tiny-model` printed (test_local_iterate_cli reads it)."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    built = subprocess.run([str(Path(sys.executable).with_name("alignctl")), "tiny-model", str(out),
                            *map(str, sorted(DATA.glob("*.jsonl")))],
                           capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)
    assert built.returncode == 0 and (out / "config.json").is_file(), built.stdout + built.stderr
    return SimpleNamespace(path=out, stdout=built.stdout, stderr=built.stderr)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_build) -> Path:
    return tiny_model_build.path
