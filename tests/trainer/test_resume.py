"""A killed stage continues from its newest complete checkpoint when run again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def _kill_after_first_checkpoint(cmd, env, out: Path, timeout=180) -> int:
    """Start cmd, SIGKILL it once some checkpoint-N/trainer_state.json exists; return N."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
            if done:
                proc.send_signal(signal.SIGKILL)  # no chance to clean up, like a preempted pod
                proc.wait(30)
                return done[0]
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited ({proc.returncode}) before its first checkpoint")
            time.sleep(0.1)
        raise AssertionError("no checkpoint within the timeout")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_run_resumes_from_newest_complete_checkpoint(tmp_path, tiny_model, data_dir, kit):
    total = 40
    path = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                            training={"max_steps": total, "learning_rate": 1e-3, "per_device_train_batch_size": 8,
                                      "max_length": 64, "logging_steps": 1, "save_steps": 4,
                                      "save_total_limit": 5})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "alignment_trainer", path]
    first = _kill_after_first_checkpoint(cmd, kit.trainer_env(), out)
    killed_at = max(r["step"] for r in kit.metrics(out))
    assert killed_at < total and not (out / "final").exists()

    # A save that was cut off halfway: no trainer_state.json. It must be ignored (and cleared).
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    half = out / f"checkpoint-{newest + 4}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"truncated")

    lines_before = len(kit.metrics(out))
    proc = kit.run_subprocess(cmd)
    start = next(e for e in kit.events(proc.stdout) if e["event"] == "start")
    assert start["resume_from"] == str(out / f"checkpoint-{newest}")
    assert newest >= first

    resumed = [r["step"] for r in kit.metrics(out)[lines_before:] if "loss" in r]
    assert resumed[0] == newest + 1, f"restarted at {resumed[0]} instead of continuing after {newest}"
    assert resumed[-1] == total
    state = json.loads((out / f"checkpoint-{total}" / "trainer_state.json").read_text())
    assert state["global_step"] == total
    assert json.loads((out / "result.json").read_text())["global_step"] == total
    assert (half / "trainer_state.json").exists() or not half.exists()  # rewritten by the run, or removed
