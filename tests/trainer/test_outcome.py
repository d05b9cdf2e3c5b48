"""The failure contract: on exit 1/2 the trainer writes its outcome (error first, a reason, what
to fix; under 4 KiB) where the recipe's termination_message_path says, and both shells read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def run_trainer(recipe: str, kit) -> tuple[int, str, dict]:
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer", recipe], env=kit.trainer_env(),
                          capture_output=True, text=True, timeout=300, cwd=kit.repo)
    message = Path(recipe).parent / "termination-log"
    return proc.returncode, proc.stderr, json.loads(message.read_text())


def test_bad_dataset_writes_a_data_error_naming_file_row_and_column(tmp_path, tiny_model, data_dir, kit):
    rows = [json.loads(line) for line in (data_dir / "prefs.jsonl").read_text().splitlines()]
    broken = tmp_path / "prefs.jsonl"
    broken.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "rejected"}) + "\n" for r in rows))
    recipe = kit.write_recipe(tmp_path, "dpo", tiny_model, [str(broken)], training={"max_steps": 1},
                              termination_message_path=str(tmp_path / "termination-log"))
    code, stderr, message = run_trainer(recipe, kit)

    assert code == 2
    assert list(message)[:3] == ["error", "reason", "exit_code"]
    assert message["reason"] == "DataError" and message["exit_code"] == 2 and "retrying will not help" in message["fix"]
    assert str(broken) in message["error"] and "line 1: column 'rejected'" in message["error"]
    assert stderr.rstrip().splitlines()[-1] == f"error: {message['error']}"
    assert len((tmp_path / "termination-log").read_bytes()) < 4096


def test_invalid_recipe_writes_a_recipe_error(tmp_path, tiny_model, data_dir, kit):
    recipe = kit.write_recipe(tmp_path, "dpo", tiny_model, [str(data_dir / "prefs.jsonl")],
                              training={"max_steps": 1, "loss_type": "kto"},
                              termination_message_path=str(tmp_path / "termination-log"))
    code, _, message = run_trainer(recipe, kit)
    assert code == 2 and message["reason"] == "RecipeError"
    assert "training.loss_type: 'kto' is not a dpo loss; accepted: sigmoid" in message["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_volume_is_disk_full_and_not_retryable(tmp_path, tiny_model, data_dir, kit):
    """The run's volume fills up at the first checkpoint: DiskFull, exit 2, not a raw traceback."""
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(volume)], check=True)
    try:
        recipe = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                                  training={"max_steps": 2, "save_steps": 1, "max_length": 64},
                                  output_dir=str(volume / "out"),
                                  termination_message_path=str(tmp_path / "termination-log"))
        code, stderr, message = run_trainer(recipe, kit)
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)
    assert code == 2, stderr[-2000:]
    assert message["reason"] == "DiskFull" and "No space left on device" in message["error"]
    assert "free space on the run's volume" in message["fix"]


def test_exit_2_survives_accelerate_launch(tmp_path, tiny_model, data_dir, kit):
    """accelerate's launcher exits 1 whenever a process fails; the stage's launcher must still exit
    2 for bad data, or the Job's podFailurePolicy (FailJob on 2) would retry it backoffLimit times."""
    from alignment_trainer.launch import build_launch_command, launch_env

    broken = tmp_path / "prefs.jsonl"
    broken.write_text('{"prompt": "hi", "chosen": "hello"}\n')
    recipe = kit.write_recipe(tmp_path, "dpo", tiny_model, [str(broken)], training={"max_steps": 1},
                              termination_message_path=str(tmp_path / "termination-log"))
    # world_size 2: the two processes form the world rendered, so the world check lets them go on to the data
    proc = subprocess.run(build_launch_command(recipe, "ddp", 2, cpu=True),
                          env=kit.trainer_env(launch_env(cpu=True, world_size=2)),
                          capture_output=True, text=True, timeout=300, cwd=kit.repo)
    message = json.loads((tmp_path / "termination-log").read_text())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message["reason"] == "DataError" and "'rejected'" in message["error"]


def test_a_world_smaller_than_rendered_fails_at_once_with_both_numbers(tmp_path, tiny_model, data_dir, kit):
    """A stage rendered for 2 processes whose launch formed a world of 1 (one rank launched alone) fails
    before it reads data or trains a step: WorldSizeMismatch, exit 2 (the podFailurePolicy fails it at once)."""
    from alignment_trainer.launch import WORLD_ENV

    recipe = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                              training={"max_steps": 2, "save_steps": 1},
                              termination_message_path=str(tmp_path / "termination-log"))
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer", recipe], env=kit.trainer_env({WORLD_ENV: "2"}),
                          capture_output=True, text=True, timeout=300, cwd=kit.repo)
    message = json.loads((tmp_path / "termination-log").read_text())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message["reason"] == "WorldSizeMismatch"
    assert "rendered for 2 processes" in message["error"] and "formed a world of 1" in message["error"]
    out = Path(recipe).parent / "out"
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists(), "no step was trained"
    assert '"event": "start"' not in proc.stdout
