"""Iterating on a run from the command line, on a short tiny pipeline (a few steps per stage): a
second `run --local` of a running run refused naming the first, an edit to a finished stage refused
with the command that applies it, `--set` + `--redo` applying it (and redoing what read the stage),
`--from` rerunning the tail only. Also: `tiny-model` prints no DeepSpeed GPU warning."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_local_run import ALIGNCTL, ENV, REPO, events, start, status_of, wait, write_run


def shorten(stages):
    stages[0]["training"].update(maxSteps=4, loggingSteps=2)
    stages[1]["training"].update(maxSteps=3, loggingSteps=1)
    stages[2]["eval"].update(numGenerations=2, maxNewTokens=8)


def alignctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ALIGNCTL, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)


def mtimes(run_dir: Path) -> dict[str, int]:
    return {name: (run_dir / name / "result.json").stat().st_mtime_ns for name in ("sft", "dpo", "eval")}


@pytest.fixture(scope="module")
def model(tiny_model_build) -> Path:
    """The tiny model, built as the README builds it (conftest.py, once per session): without
    DeepSpeed's GPU warning on a CPU machine."""
    built = tiny_model_build
    assert "written to" in built.stdout  # it ran, and said nothing about accelerators:
    assert "DeepSpeed" not in built.stderr + built.stdout and "unable to detect" not in built.stderr + built.stdout
    return built.path


@pytest.mark.trainer
def test_inspect_shows_samples_lengths_cuts_and_invalid_rows(tmp_path, model):
    chats = tmp_path / "chats.jsonl"
    long_reply = " ".join(["pencil"] * 60)
    chats.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."}]},
        {"messages": [{"role": "user", "content": "Repeat pencil"}, {"role": "assistant", "content": long_reply}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]},  # invalid role
    ]) + "\n")

    def edit(stages):
        stages[0]["datasets"] = [{"source": str(chats), "maxInvalidFraction": 0.5}]
        stages[0]["training"]["maxLength"] = 32

    run = write_run(tmp_path, model, edit)
    proc = alignctl("inspect", str(run), "--stage", "sft", "--samples", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "=== stage sft (sft)" in out and "=== stage dpo" not in out
    assert f"{chats} split train: 2 examples; 1 of 3 rows invalid, skipped; first: line 3: column 'messages'" in out
    assert "train: 2 rows" in out and "tokens per sequence:   p50 " in out
    assert "sequences cut to max_length 32 (keeping the start: the reply's end goes): 1, " in out
    sample = out.split("--- train sample 1 ---")[1]
    assert "⟦5." in sample and "What is 2 plus 3?" in sample and "⟦What" not in sample  # only the reply is trained

    # The same data with no invalid row allowed: the stage would fail, and inspect says so now.
    bad = alignctl("inspect", str(run), "--stage", "sft", "--set", "stages.sft.datasets[0].maxInvalidFraction=0",
                   cwd=tmp_path)
    assert bad.returncode == 2 and "the stage FAILS (maxInvalidFraction 0.0)" in bad.stdout, bad.stdout + bad.stderr
    assert "error: dataset " in bad.stderr and "line 3" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.trainer
@pytest.mark.slow
def test_lock_edit_refusal_set_redo_and_from(tmp_path, model):
    run, workdir = write_run(tmp_path, model, shorten), tmp_path / "runs"
    run_dir = workdir / "default" / "tiny"
    first = start(run, workdir)
    t0 = time.time()
    while not (run_dir / "status.json").is_file() or status_of(run_dir)["stages"][0]["phase"] != "Running":
        assert first[0].poll() is None and time.time() - t0 < 300, wait(first)[1][-3000:]
        time.sleep(0.2)
    second = alignctl("run", "--local", str(run), "--workdir", str(workdir), cwd=tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "is in use by another alignctl run --local" in second.stderr and f"pid {first[0].pid} " in second.stderr
    code, out = wait(first)
    assert code == 0, out[-3000:]
    assert status_of(run_dir)["phase"] == "Succeeded"
    done = mtimes(run_dir)

    # An edit to the finished DPO stage: refused, nothing runs, and the message says how to apply it.
    edit = ["--set", "stages.dpo.training.beta=0.2"]
    refused = alignctl("run", "--local", str(run), "--workdir", str(workdir), *edit, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "stage dpo already succeeded, and its spec changed since (training.beta: 0.1 -> 0.2)" in refused.stderr
    assert "--set stages.dpo.training.beta=0.2 --redo dpo (also redoes eval, which read it)" in refused.stderr
    assert mtimes(run_dir) == done

    # --redo applies it: DPO and the eval that read it run again from scratch; SFT is kept.
    redone = alignctl("run", "--local", str(run), "--workdir", str(workdir), *edit, "--redo", "dpo", cwd=tmp_path)
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr
    assert "- redo: dpo, eval run again from scratch" in redone.stdout
    after = mtimes(run_dir)
    assert after["sft"] == done["sft"] and after["dpo"] > done["dpo"] and after["eval"] > done["eval"]
    assert yaml.safe_load((run_dir / "dpo" / "recipe.yaml").read_text())["training"]["beta"] == 0.2
    starts = [e for e in events(run_dir / "dpo" / "log.txt") if e["event"] == "start"]
    assert len(starts) == 1 and not starts[0].get("resume_from"), starts  # from scratch, not resumed
    assert [s["attempts"] for s in status_of(run_dir)["stages"]] == [1, 1, 1]

    # --from eval (with the same --set, else DPO reads as edited again): only eval runs.
    tail = alignctl("run", "--local", str(run), "--workdir", str(workdir), *edit, "--from", "eval", cwd=tmp_path)
    assert tail.returncode == 0, tail.stdout[-3000:] + tail.stderr
    last = mtimes(run_dir)
    assert (last["sft"], last["dpo"]) == (after["sft"], after["dpo"]) and last["eval"] > after["eval"]
    assert "stage sft succeeded earlier" in tail.stdout and "stage dpo succeeded earlier" in tail.stdout


@pytest.mark.trainer
def test_inspect_shows_a_grpo_stages_prompts_with_their_reference_answers(tmp_path, model):
    doc = yaml.safe_load((REPO / "examples" / "grpo-tiny-run.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model)  # the data paths as the example has them, from the repository root
    run = tmp_path / "grpo.yaml"
    run.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = alignctl("inspect", str(run), "--stage", "grpo", "--samples", "1", "--workdir", str(tmp_path / "runs"),
                    "--set", "stages.grpo.training.maxPromptLength=12", cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "reference column(s) the rules read: answer" in out and "train: 72 prompts" in out and "test: 14 prompts" in out
    assert "prompts cut to 12 tokens" in out and "keeping the end): 72" in out  # every prompt (15 tokens) is cut
    assert "--- train sample 1 (answer = '4') ---" in out
