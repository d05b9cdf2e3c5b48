"""`alignctl run --local` end to end on examples/tiny-run.yaml, as the README runs it:
SFT -> DPO -> eval on a tiny random model, interrupted with Ctrl-C during DPO and run again;
a dataset with a missing column failing its stage; an invalid run refused.

The run file is examples/tiny-run.yaml itself, only with its paths made absolute (the tiny
model built into a temporary directory, examples/data/ from this checkout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
ALIGNCTL = str(Path(sys.executable).with_name("alignctl"))
# One intra-op thread per process: on two shared cores, far faster than two threads contending.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def write_run(directory: Path, model: Path, edit=None) -> Path:
    """examples/tiny-run.yaml with absolute paths, optionally edited, written to directory/run.yaml."""
    doc = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model)
    for stage in doc["spec"]["stages"]:
        for d in stage.get("datasets", []) + stage.get("testDatasets", []) + [(stage.get("eval") or {}).get("prompts")]:
            if d:
                d["source"] = str(REPO / d["source"])
    if edit:
        edit(doc["spec"]["stages"])
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start(run: Path, workdir: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """`alignctl run --local` in the background, its output to a file beside the workdir (`env`: added to ENV)."""
    log = workdir.parent / f"alignctl-{time.time_ns()}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([ALIGNCTL, "run", "--local", str(run), "--workdir", str(workdir)], stdout=f,
                                stderr=subprocess.STDOUT, text=True, env={**ENV, **(env or {})}, cwd=workdir.parent)
    return proc, log


def wait(started: tuple[subprocess.Popen, Path], timeout: float = 900) -> tuple[int, str]:
    """Exit code and output of a started run."""
    proc, log = started
    return proc.wait(timeout=timeout), log.read_text()


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def stage(status: dict, name: str) -> dict:
    return next(s for s in status["stages"] if s["name"] == name)


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"event"')]


@pytest.mark.trainer
@pytest.mark.slow
def test_pipeline_interrupted_during_dpo_resumes_and_dpo_beats_sft(tmp_path, tiny_model):
    run, workdir = write_run(tmp_path, tiny_model), tmp_path / "runs"
    run_dir = workdir / "default" / "tiny"
    sft, dpo = run_dir / "sft", run_dir / "dpo"
    t0 = time.time()

    # First run: Ctrl-C once DPO has written its first complete checkpoint.
    first = start(run, workdir)
    proc = first[0]
    shown = set()  # status.json's progressSummary while it runs (the PROGRESS column on a cluster)
    while not any(dpo.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, wait(first)[1][-3000:]
        assert time.time() - t0 < 600, "no DPO checkpoint after 10 minutes"
        if (run_dir / "status.json").is_file():
            shown.add(status_of(run_dir).get("progressSummary"))
        time.sleep(0.5)
    assert any(s and s.startswith("dpo ") and "%" in s for s in shown), shown
    proc.send_signal(signal.SIGINT)
    code, out = wait(first, timeout=120)
    assert code == 130, out[-3000:]
    status = status_of(run_dir)
    assert status["phase"] == "Pending" and stage(status, "sft")["phase"] == "Succeeded"
    assert stage(status, "dpo")["phase"] == "Pending" and "interrupted" in stage(status, "dpo")["message"]
    saved = max(int(p.parent.name.split("-")[1]) for p in dpo.glob("checkpoint-*/trainer_state.json"))
    sft_files = [sft / "log.txt", sft / "result.json", sft / "final" / "model.safetensors", sft / "metrics.jsonl"]
    sft_mtimes = [p.stat().st_mtime_ns for p in sft_files]

    # Second run: SFT skipped, DPO resumed from its newest checkpoint, then eval.
    code, out = wait(start(run, workdir))
    wall = time.time() - t0
    assert code == 0, out[-4000:]
    assert [p.stat().st_mtime_ns for p in sft_files] == sft_mtimes, "SFT ran again"
    assert "stage sft succeeded earlier" in out
    status = status_of(run_dir)
    assert (status["phase"], status["progress"], status["model"]) == ("Succeeded", "3/3", str(dpo / "final"))
    assert [s["attempts"] for s in status["stages"]] == [1, 2, 1]
    starts = [e for e in events(dpo / "log.txt") if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resume_from"].endswith(f"checkpoint-{saved}")
    resumed = [e["step"] for e in events(dpo / "log.txt")[events(dpo / "log.txt").index(starts[1]):]
               if e["event"] == "progress"]
    assert resumed and min(resumed) > saved, (saved, resumed)
    dpo_result = json.loads((dpo / "result.json").read_text())
    assert dpo_result["global_step"] == resumed[-1]
    # The live progress the local shell wrote: the fields a cluster's status gets from the trainer's pushes.
    live = stage(status, "dpo")["progress"]
    logged = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert (live["percent"], live["step"], live["totalSteps"]) == (100, resumed[-1], resumed[-1])
    assert live["loss"] == pytest.approx([r["loss"] for r in logged if "loss" in r][-1], rel=1e-5)
    assert live["rewardMargin"] == pytest.approx([r["rewards/margins"] for r in logged if "rewards/margins" in r][-1],
                                                 rel=1e-5)

    # Every stage's outputs and metrics are in the status.
    for name in ("sft", "dpo"):
        s = stage(status, name)
        assert Path(s["checkpoint"], "model.safetensors").is_file() and "train_loss" in s["metrics"]
        assert (run_dir / name / "metrics.jsonl").is_file()
    ev = status["evaluation"]
    assert ev["stage"] == "eval" and stage(status, "eval")["metrics"] == {k: v for k, v in ev.items() if k != "stage"}
    print(f"\nwall time (both runs, incl. the interrupted one): {wall:.0f} s")
    print(f"held-out pairs preferring chosen: DPO model {ev['logp_accuracy']:.3f}, SFT model "
          f"{ev['reference_logp_accuracy']:.3f}; DPO implicit-reward accuracy {ev['preference_accuracy']:.3f}, "
          f"margin {ev['reward_margin']:.3f}")
    assert ev["logp_accuracy"] - ev["reference_logp_accuracy"] >= 0.15
    assert ev["preference_accuracy"] >= 0.8 and ev["reward_margin"] > 0
    assert ev["generation_stop_rate"] >= 0.75
    generations = (run_dir / "eval" / "generations.jsonl").read_text().splitlines()
    eval_spec = yaml.safe_load(run.read_text())["spec"]["stages"][2]["eval"]
    prompts = Path(eval_spec["prompts"]["source"]).read_text().split("\n")
    assert len(generations) == min(eval_spec["numGenerations"], len([p for p in prompts if p.strip()]))
    assert (run_dir / "curves.png").stat().st_size > 10_000 and (run_dir / "eval" / "curves.png").is_file()
    assert "NAME" in out and "PROGRESS" in out and "tiny " in out and "Succeeded" in out


@pytest.mark.trainer
@pytest.mark.slow
def test_missing_column_fails_the_stage_and_keeps_earlier_checkpoints(tmp_path, tiny_model):
    broken = tmp_path / "prefs-no-rejected.jsonl"
    rows = [json.loads(line) for line in (DATA / "prefs.jsonl").read_text().splitlines() if line.strip()]
    broken.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "rejected"}) + "\n" for r in rows))

    def edit(stages):
        stages[0]["training"].update(maxSteps=2, saveSteps=1)  # a short SFT that leaves checkpoints
        stages[1]["datasets"] = [{"source": str(broken)}]

    run, workdir = write_run(tmp_path, tiny_model, edit), tmp_path / "runs"
    run_dir = workdir / "default" / "tiny"
    code, out = wait(start(run, workdir), timeout=600)
    assert code == 1, out[-3000:]
    status = status_of(run_dir)
    dpo = stage(status, "dpo")
    assert status["phase"] == "Failed" and dpo["phase"] == "Failed"
    assert str(broken) in dpo["message"] and "'rejected'" in dpo["message"], dpo["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "'rejected'" in failed["message"]
    assert stage(status, "eval")["phase"] == "Pending"
    sft = run_dir / "sft"
    assert stage(status, "sft")["phase"] == "Succeeded" and (sft / "final" / "model.safetensors").is_file()
    assert (sft / "checkpoint-2" / "trainer_state.json").is_file() and (sft / "result.json").is_file()
    # The trainer's message, once, with where its output is; no traceback (that stays in log.txt).
    assert out.count(f"stage dpo failed: DataError") == 1 and "its output: " in out, out[-3000:]
    assert "'rejected'" in out and "Traceback" not in out and "Traceback" in (run_dir / "dpo" / "log.txt").read_text()

    # The same command again retries the failed stage (and only it).
    sft_mtime = (sft / "result.json").stat().st_mtime_ns
    code, out = wait(start(run, workdir), timeout=300)
    assert code == 1 and "trying again" in out, out[-3000:]
    assert (sft / "result.json").stat().st_mtime_ns == sft_mtime
    assert [s["attempts"] for s in status_of(run_dir)["stages"]] == [1, 2, 0]


def test_invalid_run_is_refused_naming_the_field(tmp_path):
    run = write_run(tmp_path, tmp_path / "no-model", lambda stages: stages[1].update(trainig={"beta": 0.1}))
    proc = subprocess.run([ALIGNCTL, "run", "--local", str(run), "--workdir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "spec.stages[1].trainig: unknown field" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_stage_command_one_process_or_accelerate_launch(tmp_path):
    """One process: python -m alignment_trainer; several: accelerate launch; the run's env is passed on."""
    from alignment_operator.api import parse_run
    from alignment_trainer.launch import build_launch_command
    from alignment_operator.local.runner import stage_command

    doc = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["stages"][0]["resources"]["processesPerNode"] = 2
    doc["spec"]["trainer"] = {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}
    run = parse_run(doc)
    recipe = tmp_path / "recipe.yaml"
    cmd, env = stage_command(run, 0, recipe)
    launch = build_launch_command(str(recipe), "ddp", 2, cpu=True)  # no GPU asked for: a CPU launch
    assert cmd == [sys.executable, *launch[1:]]
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    cmd, _ = stage_command(run, 1, recipe)
    assert cmd == [sys.executable, "-m", "alignment_trainer", str(recipe)]


def _trainer_pid(recipe: Path) -> int | None:
    """The process running `python -m alignment_trainer <recipe>`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"alignment_trainer" in args and str(recipe).encode() in args:
            return int(cmdline.parent.name)
    return None


@pytest.mark.trainer
@pytest.mark.slow
def test_a_stopped_stage_is_restarted_from_its_checkpoint_and_the_run_succeeds(tmp_path, tiny_model):
    """Issue 31: the SFT stage's trainer is frozen (SIGSTOP) once checkpoint-5 is written. With
    hangTimeoutSeconds 15 the local runner sees no step and no heartbeat, names the stopped process, kills
    it, and reconcile restarts the stage from its newest checkpoint (restarts 1, reason Hang): the run succeeds."""
    def sft_only(stages):
        del stages[1:]
        stages[0]["hangTimeoutSeconds"] = 15
        stages[0]["training"].update(epochs=None, maxSteps=20, saveSteps=5, loggingSteps=5)
        stages[0]["training"] = {k: v for k, v in stages[0]["training"].items() if v is not None}

    run = write_run(tmp_path, tiny_model, sft_only)
    workdir = tmp_path / "runs"
    t0 = time.monotonic()
    proc, log = start(run, workdir)
    sft = workdir / "default" / "tiny" / "sft"
    while not (sft / "checkpoint-5" / "trainer_state.json").is_file():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 600, "no checkpoint-5"
        time.sleep(0.2)
    pid = _trainer_pid(sft / "recipe.yaml")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    code, out = wait((proc, log))
    assert code == 0, out[-3000:]
    st = stage(status_of(workdir / "default" / "tiny"), "sft")
    assert st["phase"] == "Succeeded" and st["restarts"] == 1 and st["restartReasons"] == {"Hang": 1}
    assert f"stopped: rank 0 (pid {pid})" in st["lastRestart"] and "hangTimeoutSeconds 15" in st["lastRestart"]
    assert f"! stage sft: Hang: no progress or heartbeat for" in out
    resumed = [e["resume_from"] for e in events(sft / "log.txt") if e["event"] == "start"]
    assert resumed[0] is None and resumed[-1] is not None and int(resumed[-1].rsplit("-", 1)[1]) >= 5, resumed
    print(f"stopped {stopped - t0:.0f}s after the start; the run succeeded {time.monotonic() - stopped:.0f}s later")
