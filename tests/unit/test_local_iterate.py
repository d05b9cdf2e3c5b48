"""Iterating with `alignctl run --local` without training anything: --set overrides validated like the
file, local paths checked before any stage starts, one run per run directory, --from/--redo and the
refusal of an edit to a stage that already succeeded; and the CPU threads each process gets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import AlignmentRunStatus, RunInvalid, StageStatus, parse_run
from alignment_operator.cli import main as alignctl
from alignment_operator.local import plan
from alignment_operator.local.lock import RunLock, RunLocked
from alignment_operator.local.overrides import apply_overrides
from alignment_operator.local.paths import path_problems
from alignment_operator.local.runner import local_threads, read_run, write_status
from alignment_operator.reconcile import stage_hash
from alignment_operator.render.manifests import RenderContext, build_stage
from alignment_operator.render.recipe import build_recipe, stage_dir
from alignment_trainer.launch import cpu_quantity, threads_per_process, usable_cpus

ROOT = Path(__file__).resolve().parents[2]
ALIGNCTL = str(Path(sys.executable).with_name("alignctl"))


def tiny_doc(model: Path | str = "runs/tiny-model") -> dict:
    """examples/tiny-run.yaml with the data sources absolute and the given model."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model)
    for stage in doc["spec"]["stages"]:
        for d in stage.get("datasets", []) + stage.get("testDatasets", []) + [(stage.get("eval") or {}).get("prompts")]:
            if d:
                d["source"] = str(ROOT / d["source"])
    return doc


@pytest.fixture
def model(tmp_path) -> Path:
    """A directory that passes for a model as far as paths go (nothing here loads it)."""
    out = tmp_path / "runs" / "tiny-model"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    return out


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- --set

def test_set_changes_a_stage_by_name_or_index_and_the_run_validates_with_it():
    doc = tiny_doc()
    shown = apply_overrides(doc, ["stages.dpo.training.beta=0.05", "spec.stages[0].datasets[0].weight=0.5",
                                  "stages.eval.eval.metrics=[preference, loss]", "model.dtype=bfloat16"])
    assert shown[0] == "spec.stages[1].training.beta=0.05"
    run = parse_run(doc)
    assert run.spec.stages[1].training.beta == 0.05 and run.spec.stages[0].datasets[0].weight == 0.5
    assert run.spec.stages[2].eval.metrics == ["preference", "loss"] and run.spec.model.torch_dtype == "bfloat16"


@pytest.mark.parametrize("override, expected", [
    ("stages.dpo.training.beta=-1", ["spec.stages[1].training.beta", "greater than 0", "-1"]),
    ("stages.dpo.training.lossType=sigmod", ["spec.stages[1].training.lossType", "'sigmod'", "sigmoid"]),
    ("stages.dpo.training.betaa=0.1", ["spec.stages[1].training.betaa", "unknown field"]),
    ("stages.dpoo.training.beta=0.1", ["no stage named 'dpoo'", "sft, dpo, eval"]),
    ("stages[7].training.beta=0.1", ["spec.stages[7]", "out of range", "3 item"]),
    ("stages.dpo.training.beta", ["expected path=value"]),
])
def test_a_bad_override_is_refused_naming_the_path_the_value_and_what_is_accepted(tmp_path, model, capsys, override,
                                                                                 expected):
    code = alignctl(["run", "--local", str(write(tmp_path, tiny_doc(model))), "--set", override,
                     "--workdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ERR ")
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "runs" / "default").exists(), "nothing may start on a refused override"


# ---------------------------------------------------------------------------- local paths

def test_a_missing_model_path_fails_at_once_with_the_fix_and_no_traceback(tmp_path):
    (tmp_path / "runs").mkdir()
    run = write(tmp_path, tiny_doc("runs/tiny-model"))
    t0 = time.monotonic()
    proc = subprocess.run([ALIGNCTL, "run", "--local", str(run)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    took = time.monotonic() - t0
    print(f"\nmissing model path: exit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("ERR ") == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "spec.model.source: 'runs/tiny-model' does not exist" in proc.stderr
    assert "alignctl tiny-model runs/tiny-model" in proc.stderr  # the fix
    assert not (tmp_path / "runs" / "default").exists()


def test_a_typo_in_a_path_names_what_is_there(tmp_path, model):
    doc = tiny_doc("runs/tiny-modle")
    doc["spec"]["stages"][0]["datasets"][0]["source"] = str(ROOT / "examples" / "data" / "sft.jsnl")
    problems = path_problems(parse_run(doc), base=tmp_path)
    assert len(problems) == 2, problems
    assert problems[0].startswith("spec.model.source: 'runs/tiny-modle' does not exist")
    assert f"did you mean {tmp_path}/runs/tiny-model?" in problems[0]
    assert problems[1].startswith("spec.stages[0].datasets[0].source:") and "sft.jsonl" in problems[1]


def test_hub_ids_are_not_paths_and_validate_checks_only_what_is_meant_to_be_here(tmp_path, model, capsys):
    doc = tiny_doc("mistralai/Mistral-7B-v0.1")
    doc["spec"]["stages"][0]["datasets"][0]["source"] = "HuggingFaceH4/ultrachat_200k"
    doc["spec"]["stages"][1]["datasets"][0]["source"] = "/workspace/data/prefs.jsonl"  # on the run's volume
    assert path_problems(parse_run(doc), base=tmp_path, strict=False) == []
    # run --local runs here: the volume's path is not here, so it is refused (the Hub ids are not).
    strict = path_problems(parse_run(doc), base=tmp_path)
    assert len(strict) == 1 and strict[0].startswith("spec.stages[1].datasets[0].source: '/workspace/data/prefs.jsonl'")

    # validate: a file in a directory that is here (a typo) fails; the example files pass.
    doc = tiny_doc(model)
    doc["spec"]["stages"][1]["testDatasets"][0]["source"] = str(ROOT / "examples" / "data" / "prefs_tst.jsonl")
    assert alignctl(["validate", str(write(tmp_path, doc)), str(ROOT / "examples" / "zephyr-run.yaml")]) == 1
    out = capsys.readouterr()
    assert "spec.stages[1].testDatasets[0].source: " in out.err and "did you mean" in out.err and "prefs_test.jsonl" in out.err
    assert out.out.startswith(f"ok  {ROOT / 'examples' / 'zephyr-run.yaml'}")
    # A model directory not built yet (beside one that is) could still be a Hub id: a note, not a failure.
    doc = tiny_doc("runs/sums-model")
    notes: list[str] = []
    assert path_problems(parse_run(doc), base=tmp_path, strict=False, notes=notes) == []
    assert len(notes) == 1 and "'runs/sums-model' does not exist" in notes[0] and "run --local refuses it" in notes[0]
    assert path_problems(parse_run(doc), base=tmp_path)[0].startswith("spec.model.source: 'runs/sums-model'")


# ---------------------------------------------------------------------------- the run lock

HOLD = """
import sys, time
from pathlib import Path
from alignment_operator.local.lock import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_of_the_same_run_is_refused_naming_the_holder(tmp_path, model, capsys):
    run_dir = tmp_path / "runs" / "default" / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} "):
            RunLock(run_dir).__enter__()
        code = alignctl(["run", "--local", str(write(tmp_path, tiny_doc(model))), "--workdir", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code == 2 and "is in use by another alignctl run --local" in err and f"kill -INT {holder.pid}" in err
        assert not (run_dir / "status.json").exists() and not (run_dir / "sft").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir):  # the kernel released it when the holder died: no stale lock
        pass


# ---------------------------------------------------------------------------- --from, --redo, edits

def succeeded(run, root: str, names: list[str]) -> AlignmentRunStatus:
    """A status in which `names` succeeded, each with the recipe it ran beside its outputs."""
    stages = []
    for i, spec in enumerate(run.spec.stages):
        if spec.name in names:
            out = Path(stage_dir(root, run, spec.name))
            (out / "final").mkdir(parents=True)
            (out / "recipe.yaml").write_text(build_recipe(run, i, root).dump())
            stages.append(StageStatus(name=spec.name, phase="Succeeded", spec_hash=stage_hash(run, i), attempts=1))
        else:
            stages.append(StageStatus(name=spec.name))
    return AlignmentRunStatus(stages=stages, evaluation={"stage": "eval", "logp_accuracy": 0.9})


def test_redo_takes_every_stage_that_read_the_redone_one(tmp_path):
    run, root = parse_run(tiny_doc()), str(tmp_path)
    assert plan.readers(run, root) == {"sft": {"dpo", "eval"}, "dpo": {"eval"}, "eval": set()}
    assert plan.to_redo(run, root, ["sft"], None) == ["sft", "dpo", "eval"]
    assert plan.to_redo(run, root, ["eval"], None) == ["eval"]
    assert plan.to_redo(run, root, [], "dpo") == ["dpo", "eval"]
    assert plan.to_redo(run, root, [], None) == []
    with pytest.raises(plan.PlanError, match="--from dop: no such stage; the stages: sft, dpo, eval"):
        plan.to_redo(run, root, [], "dop")


def test_an_edit_to_a_stage_that_succeeded_is_refused_with_the_change_and_the_command(tmp_path, model, capsys):
    root = str(tmp_path / "runs")
    run = parse_run(tiny_doc(model))
    status = succeeded(run, root, ["sft", "dpo"])
    run_dir = Path(stage_dir(root, run, "-")).parent
    write_status(run_dir, status)
    before = (run_dir / "status.json").read_text()
    path = write(tmp_path, tiny_doc(model))

    code = alignctl(["run", "--local", str(path), "--workdir", root, "--set", "stages.dpo.training.beta=0.2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "stage dpo already succeeded, and its spec changed since (training.beta: 0.1 -> 0.2)" in err, err
    assert "--set stages.dpo.training.beta=0.2 --redo dpo (also redoes eval, which read it)" in err
    assert "revert the edit" in err
    assert (run_dir / "status.json").read_text() == before and (run_dir / "dpo" / "final").is_dir()

    # --redo applies it: dpo's and eval's outputs go, their status starts over; sft's stays.
    edited = read_run(str(path), ["stages.dpo.training.beta=0.2"])
    again = plan.to_redo(edited, root, ["dpo"], None)
    plan.edited_finished(edited, status, root, again, "alignctl run --local run.yaml")  # no error now
    removed = plan.reset(edited, status, root, again)
    assert removed == [str(run_dir / "dpo")] and (run_dir / "sft" / "final").is_dir()
    assert [(s.name, s.phase, s.spec_hash) for s in status.stages] == [
        ("sft", "Succeeded", stage_hash(run, 0)), ("dpo", "Pending", None), ("eval", "Pending", None)]
    assert status.evaluation == {}


# ---------------------------------------------------------------------------- CPU threads

def test_threads_are_the_cpus_a_process_has_divided_by_processes(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a pod limited to 1.5 CPUs
    assert usable_cpus(tmp_path) == min(1.5, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert [threads_per_process(p, 8) for p in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert [cpu_quantity(q) for q in ("500m", 2, "1.5", None, "x")] == [0.5, 2.0, 1.5, None, None]


def test_rendered_pods_bound_threads_by_their_cpu_per_process():
    doc = tiny_doc()
    doc["spec"]["stages"][0]["resources"].update(cpu=8, processesPerNode=2)
    doc["spec"]["stages"][1]["resources"].pop("cpu")
    run = parse_run(doc)
    env = {e["name"]: e.get("value") for e in
           next(o for o in build_stage(run, 0, RenderContext(), "h") if o["kind"] == "Job")
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["TOKENIZERS_PARALLELISM"]) == ("4", "4", "false")
    # No CPU in the spec: nothing rendered; the trainer bounds itself by its cgroup's quota at start.
    env = [e["name"] for e in next(o for o in build_stage(run, 1, RenderContext(), "h") if o["kind"] == "Job")
           ["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "OMP_NUM_THREADS" not in env and "TOKENIZERS_PARALLELISM" in env


def test_local_threads_leave_out_the_cores_other_work_keeps_busy(monkeypatch, capsys):
    from alignment_operator.local import runner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner, "usable_cpus", lambda: 4.0)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(runner, "busy_cpus", lambda: 0.2)
    assert local_threads(1) == 3 and local_threads(2) == 1  # 3.8 free cores
    monkeypatch.setattr(runner, "busy_cpus", lambda: 3.9)  # two hogs and more: one thread, never zero
    assert local_threads(1) == 1
    assert "1 thread(s) per process (4 usable cores, 3.9 busy with other work, 1 process(es))" in capsys.readouterr().out
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # yours wins
    assert local_threads(1) == 3


def test_the_trainer_process_sets_torch_threads_from_the_bound():
    code = ("from alignment_trainer.launch import bound_threads; import torch, os; n = bound_threads(); "
            "print(n, torch.get_num_threads(), os.environ['MKL_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1", "1"]
    # Unset: the usable CPUs divided by the processes accelerate started on this machine.
    for processes, expected in ((1, int(usable_cpus())), (64, 1)):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "LOCAL_WORLD_SIZE": str(processes)},
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == [str(expected)] * 3


# ---------------------------------------------------------------------------- progress lines

def test_a_progress_line_fits_the_terminal_and_keeps_the_eta():
    from alignment_operator.local.view import fit_line

    args = ("dpo", 40, 150, "26% ETA 12m54s  50 tok/s", "0.14 it/s", ["loss 0.6931", "acc 0.5", "margin 0.01234"])
    whole = fit_line(*args, None)
    assert whole.endswith("margin 0.01234  0.14 it/s") and len(whole) > 100
    for width in (120, 100, 80, 60, 45):
        line = fit_line(*args, width)
        assert len(line) <= width and "40/150  26% ETA 12m54s" in line, (width, line)
    assert "loss 0.6931" in fit_line(*args, 100) and "loss" not in fit_line(*args, 80) and "[" in fit_line(*args, 60) and "[" not in fit_line(*args, 45)


# ---------------------------------------------------------------------------- the GRPO examples

@pytest.mark.parametrize("name, gpus", [("grpo-tiny-run.yaml", 0), ("grpo-run.yaml", 8)])
def test_the_grpo_examples_render_a_math_task_with_rule_rewards(name, gpus):
    from alignment_operator.api import load_run

    run = load_run(ROOT / "examples" / name)
    index = next(i for i, s in enumerate(run.spec.stages) if s.method == "grpo")
    recipe = build_recipe(run, index, "/workspace")
    kinds = [(r.kind, r.column) for r in recipe.grpo.rewards]
    assert kinds[0][0] == "regex" and kinds[1][0] == "format" and kinds[0][1] in ("answer", "solution")
    assert run.spec.stages[index].resources.gpus_per_node == gpus
    pattern = re.compile(recipe.grpo.rewards[0].pattern)
    answer = "The answer is 7." if gpus == 0 else "Adding them gives 7.\nAnswer: 7"
    assert pattern.search(answer).group(1) == "7"  # the rule reads the number a right completion gives
    assert run.spec.stages[-1].method == "eval" and run.spec.stages[-1].from_ == "grpo"
