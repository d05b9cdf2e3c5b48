"""Preference sweeps (issue 26) as tables: stages as a graph by what they read, siblings side by side
within parallelism, a failed branch failing its readers only, gpuSeconds over attempts, and the eval of
several stages' comparison. Pure: reconcile's input and output, no shell."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import yaml

from alignment_operator.local.view import compare_table
from alignment_operator.api import RETRY_ANNOTATION, AlignmentRunStatus, StageStatus, parse_run
from alignment_operator.progress import summary
from alignment_operator.reconcile import CreateStage, DeleteChild, Event, ObservedChild, SetSuspend, reconcile

ROOT = Path(__file__).resolve().parents[2]
T0 = "2026-11-21T12:00:00Z"
VARIANTS = ["dpo-0-01", "dpo-0-1", "dpo-0-5"]
EVALS = [f"eval-{v}" for v in VARIANTS]


def at(seconds: float) -> str:
    t = datetime.fromisoformat(T0.replace("Z", "+00:00")) + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def sweep(status: dict | None = None, annotations: dict | None = None, **spec):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sweep.yaml").read_text())
    doc["metadata"].update(namespace="default", uid="u-1", annotations=annotations or {})
    doc["spec"].update(spec)
    if status is not None:
        doc["status"] = status
    return parse_run(doc)


class Shell:
    """Plays the cluster: every created child runs until the test says how it ends."""

    def __init__(self, **spec):
        self.spec, self.status, self.children, self.created = spec, None, {}, []
        self.annotations: dict = {}

    def step(self, now: str = T0, slots: int | None = None):
        out = reconcile(sweep(self.status, self.annotations, **self.spec), 1, dict(self.children), now, slots)
        self.status = out.status.wire()
        run = sweep(**self.spec)
        for a in out.actions:
            if isinstance(a, CreateStage):
                name = run.spec.stages[a.index].name
                self.created.append(name)
                self.children[name] = ObservedChild(name, f"job-{name}", "Running", 1, created=now)
            elif isinstance(a, DeleteChild):
                self.children.pop(a.stage)
        return out

    def end(self, name: str, state: str, now: str = T0, **kw) -> None:
        c = self.children[name]
        self.children[name] = ObservedChild(name, c.name, state, 1, created=c.created, finished=now, **kw)

    def phases(self) -> dict[str, str]:
        return {s["name"]: s["phase"] for s in self.status["stages"]}


def ok(metrics: dict | None = None) -> dict:
    return {"checkpoint": "/w/final", "metrics": metrics or {"train_loss": 0.5}}


def running(out) -> list[str]:
    return [s.name for s in out.status.stages if s.phase == "Running"]


def test_a_matrix_expands_into_named_variants_with_their_values_in_status():
    run = sweep()
    assert [s.name for s in run.spec.stages] == ["sft", *VARIANTS, *EVALS]
    assert [s.training.beta for s in run.spec.stages[1:4]] == [0.01, 0.1, 0.5]
    assert {s.from_ for s in run.spec.stages[1:4]} == {"sft"}  # each from where the matrix stage starts
    assert [s.from_ for s in run.spec.stages[4:]] == VARIANTS
    shell = Shell()
    shell.step()
    st = {s["name"]: s for s in shell.status["stages"]}
    assert st["dpo-0-1"]["variantOf"] == "dpo" and st["dpo-0-1"]["matrix"] == {"beta": 0.1}
    assert st["eval-dpo-0-5"]["variantOf"] == "eval" and "matrix" not in st["sft"]


def test_siblings_start_together_once_what_they_read_succeeded():
    shell = Shell()
    out = shell.step()
    assert shell.created == ["sft"] and running(out) == ["sft"]  # the variants wait for sft
    shell.end("sft", "Succeeded", at(60), result=ok())
    out = shell.step(at(60))
    assert shell.created == ["sft", *VARIANTS]  # all three at once, each its own child
    assert running(out) == VARIANTS and out.status.phase == "Running"
    assert out.status.progress_summary == "1/7, 3 running"
    shell.end("dpo-0-1", "Succeeded", at(100), result=ok())
    out = shell.step(at(100))
    # the eval of the finished variant starts; the others' evals wait for theirs
    assert shell.created[-1] == "eval-dpo-0-1" and set(running(out)) == {"dpo-0-01", "dpo-0-5", "eval-dpo-0-1"}


def test_parallelism_bounds_the_siblings_and_a_free_slot_starts_the_next():
    shell = Shell(parallelism=2)
    shell.step()
    shell.end("sft", "Succeeded", at(60), result=ok())
    out = shell.step(at(60))
    assert shell.created == ["sft", "dpo-0-01", "dpo-0-1"]
    waiting = out.status.stages[3]
    assert (waiting.phase, waiting.reason) == ("Pending", "WaitingForSlot")
    assert "2 of at most 2" in waiting.message and "dpo-0-01, dpo-0-1" in waiting.message
    shell.end("dpo-0-01", "Succeeded", at(90), result=ok())
    out = shell.step(at(90))
    assert shell.created[3:] == ["dpo-0-5"]  # the free slot goes to the waiting sibling first (spec order)
    assert len(running(out)) == 2
    # the local shell's slots (its cores) bound it further
    solo = Shell()
    solo.step()
    solo.end("sft", "Succeeded", at(60), result=ok())
    solo.step(at(60), slots=1)
    assert solo.created == ["sft", "dpo-0-01"]


def test_a_failed_branch_fails_its_readers_only_and_the_run_fails_naming_it_after_siblings_finish():
    shell = Shell()
    shell.step()
    shell.end("sft", "Succeeded", at(60), result=ok())
    shell.step(at(60))
    shell.end("dpo-0-1", "Failed", at(80), message="Error (exit code 1): CUDA error: an illegal memory access")
    out = shell.step(at(80))
    assert out.status.phase == "Running"  # its siblings go on
    assert set(running(out)) == {"dpo-0-01", "dpo-0-5"}
    failed = {c.type: c for c in out.status.conditions}
    assert failed["Failed"].status == "True" and "dpo-0-1" in failed["Failed"].message
    assert failed["Stalled"].status == "False" and failed["Reconciling"].status == "True"
    for v in ("dpo-0-01", "dpo-0-5"):
        shell.end(v, "Succeeded", at(120), result=ok())
    out = shell.step(at(120))
    assert set(running(out)) == {"eval-dpo-0-01", "eval-dpo-0-5"}  # the evals of the others still run
    blocked = next(s for s in out.status.stages if s.name == "eval-dpo-0-1")
    assert (blocked.phase, blocked.reason) == ("Pending", "InputFailed") and "dpo-0-1" in blocked.message
    assert "eval-dpo-0-1" not in shell.created
    for e in ("eval-dpo-0-01", "eval-dpo-0-5"):
        shell.end(e, "Succeeded", at(150), result=ok({"preference_accuracy": 0.7}))
    out = shell.step(at(150))
    assert out.status.phase == "Failed" and out.status.completion_time == at(150)
    cond = {c.type: c for c in out.status.conditions}
    assert cond["Stalled"].status == "True" and "stage dpo-0-1 failed" in cond["Stalled"].message
    assert "illegal memory access" in cond["Failed"].message
    assert "RunFailed" in [a.reason for a in out.actions if isinstance(a, Event)]
    # A retry runs that branch only (then its eval): the succeeded siblings are never redone.
    shell.annotations = {RETRY_ANNOTATION: "1"}
    out = shell.step(at(200))
    assert [a.stage for a in out.actions if isinstance(a, DeleteChild)] == ["dpo-0-1"]
    out = shell.step(at(201))
    assert shell.created[-1] == "dpo-0-1" and running(out) == ["dpo-0-1"]
    assert shell.created.count("dpo-0-01") == 1 and shell.created.count("sft") == 1
    shell.end("dpo-0-1", "Succeeded", at(260), result=ok())
    shell.step(at(260))
    shell.end("eval-dpo-0-1", "Succeeded", at(280), result=ok({"preference_accuracy": 0.9}))
    out = shell.step(at(280))
    assert out.status.phase == "Succeeded"


def test_gpu_seconds_of_a_stage_with_a_restart_is_the_sum_of_its_attempts():
    doc_gpus = {"gpusPerNode": 8, "nodes": 2}
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sweep.yaml").read_text())
    for s in doc["spec"]["stages"]:
        s["resources"].update(doc_gpus)
    shell = Shell(stages=doc["spec"]["stages"])
    shell.step()
    # attempt 1: 100 s, then the group fails (retryable) and restarts from its checkpoint
    shell.children["sft"] = ObservedChild("sft", "job-sft", "Failed", 1, created=T0, finished=at(100), group=True,
                                          failure="failure", message="rank 1 exited 1")
    out = shell.step(at(100))
    st = out.status.stages[0]
    assert (st.phase, st.gpus, st.gpu_seconds, st.wall_seconds) == ("Pending", 16, 1600.0, 100.0)
    shell.step(at(105))  # the failed child goes first
    shell.step(at(110))  # attempt 2 starts
    assert shell.created == ["sft", "sft"]
    shell.end("sft", "Succeeded", at(160), result=ok())
    out = shell.step(at(160))
    st = out.status.stages[0]
    assert st.phase == "Succeeded" and st.wall_seconds == 150.0
    assert st.gpu_seconds == 16 * (100 + 50)  # GPUs x (attempt 1 + attempt 2)
    assert out.status.gpu_seconds == 2400.0 and out.status.gpu_hours == round(2400 / 3600, 2)


def test_gpu_seconds_count_the_gpus_the_shell_says_the_attempt_held():
    """`run --local` on a machine without the GPUs a stage asks for runs it on what there is (CPU here):
    its gpuSeconds count what it held, not what the spec asked."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sweep.yaml").read_text())
    doc["spec"]["stages"][0]["resources"]["gpusPerNode"] = 8
    shell = Shell(stages=doc["spec"]["stages"])
    out = shell.step()
    assert out.status.stages[0].gpus == 8  # what it asks for, while it runs
    shell.children["sft"] = ObservedChild("sft", "job-sft", "Succeeded", 1, created=T0, finished=at(50), gpus=0,
                                          result=ok())
    st = shell.step(at(50)).status.stages[0]
    assert (st.gpus, st.gpu_seconds, st.wall_seconds) == (0, 0.0, 50.0)


def test_a_cpu_only_stage_says_so():
    shell = Shell()
    shell.step()
    shell.end("sft", "Succeeded", at(30), result=ok())
    out = shell.step(at(30))
    st = out.status.stages[0]
    assert (st.gpus, st.gpu_seconds, st.wall_seconds) == (0, 0.0, 30.0)


def test_the_eval_of_several_stages_compares_them_best_first():
    shell = Shell()
    shell.step()
    shell.end("sft", "Succeeded", at(10), result=ok())
    shell.step(at(10))
    for k, v in enumerate(VARIANTS):
        shell.end(v, "Succeeded", at(20 + k), result=ok())
    shell.step(at(30))
    accuracy = {"eval-dpo-0-01": 0.6, "eval-dpo-0-1": 0.85, "eval-dpo-0-5": 0.7}
    for e, a in accuracy.items():
        shell.end(e, "Succeeded", at(40), result=ok({"preference_accuracy": a, "eval_loss": 1 - a}))
    out = shell.step(at(40))
    rows = out.status.comparison
    assert [r.stage for r in rows] == ["dpo-0-1", "dpo-0-5", "dpo-0-01"]
    assert [r.best for r in rows] == [True, False, False]
    assert rows[0].matrix == {"beta": 0.1} and rows[0].metrics["preference_accuracy"] == 0.85
    assert rows[0].eval_stage == "eval-dpo-0-1" and rows[0].gpus == 0 and rows[2].gpu_seconds == 0.0
    assert out.status.phase == "Succeeded"
    # sorted by a loss, lower is better
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sweep.yaml").read_text())
    doc["spec"]["stages"][2]["eval"]["compareBy"] = "eval_loss"
    by_loss = reconcile(sweep(shell.status, stages=doc["spec"]["stages"]), 1, shell.children, at(41)).status
    assert by_loss.comparison[0].stage == "dpo-0-1" and by_loss.comparison[-1].stage == "dpo-0-01"
    # the run's model and evaluation are the best variant's, not the last stage's in spec order
    assert out.status.model.endswith("/w/final") and out.status.evaluation["stage"] == "eval-dpo-0-1"
    # the local summary's and `alignctl compare`'s table: best first, marked, values and CPU-only shown
    table = compare_table(out.status.wire()).splitlines()
    assert table[0].split()[:3] == ["STAGE", "beta", "preference_accuracy"]
    assert table[1].split()[:4] == ["*", "dpo-0-1", "0.1", "0.85"] and table[1].split()[-1] == "cpu"
    resorted = compare_table(out.status.wire(), sort="eval_loss").splitlines()
    assert resorted[0].split()[2] == "eval_loss" and resorted[1].split()[:2] == ["*", "dpo-0-1"]
    assert [line.split()[0] for line in resorted[2:]] == ["dpo-0-5", "dpo-0-01"]  # lower loss first


def test_progress_summarises_several_running_stages():
    stages = [StageStatus(name="sft", phase="Succeeded"),
              StageStatus(name="a", phase="Running", progress={"percent": 40, "lastUpdated": T0}),
              StageStatus(name="b", phase="Running", progress={"percent": 70, "lastUpdated": T0}),
              StageStatus(name="eval")]
    assert summary(stages, 1) == "1/4, 2 running, a 40%"
    assert AlignmentRunStatus(progress_summary=summary(stages, 1))  # within its maxLength


def _sweep_doc(edit) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sweep.yaml").read_text())
    edit(doc["spec"]["stages"])
    return doc


def _refusal(doc) -> str:
    import pytest as _pytest

    from alignment_operator.api import RunInvalid

    with _pytest.raises(RunInvalid) as err:
        parse_run(doc)
    return str(err.value)


def test_stages_that_read_a_matrix_stage_by_name_are_refused_naming_the_field():
    after = {"name": "kto", "method": "kto", "datasets": [{"source": "examples/data/kto.jsonl"}],
             "resources": {"gpusPerNode": 0}}
    # a training stage after the matrix with no from would start from one variant, silently
    said = _refusal(_sweep_doc(lambda s: s.insert(2, dict(after))))
    assert "spec.stages[2].from: unset" in said and "'dpo', a matrix stage of 3 variants" in said
    said = _refusal(_sweep_doc(lambda s: s.insert(2, {**after, "from": "dpo"})))
    assert "spec.stages[2].from: 'dpo' is a matrix stage of 3 variants; name one of them (dpo-0-01, dpo-0-1, dpo-0-5)" \
        in said
    said = _refusal(_sweep_doc(lambda s: s[2]["eval"].update(reference="dpo")))
    assert "spec.stages[2].eval.reference: 'dpo' is a matrix stage" in said
    # one variant by name is fine
    run = parse_run(_sweep_doc(lambda s: s.insert(2, {**after, "from": "dpo-0-1"})))
    assert next(s for s in run.spec.stages if s.name == "kto").from_ == "dpo-0-1"


def test_an_eval_of_a_list_of_stages_compares_them_against_one_reference():
    simpo = {"name": "simpo", "method": "simpo", "from": "sft", "datasets": [{"source": "examples/data/prefs.jsonl"}],
             "resources": {"gpusPerNode": 0}}
    run = parse_run(_sweep_doc(lambda s: (s.insert(2, simpo), s[3]["eval"].update(stages=["dpo", "simpo"]))))
    evals = [s for s in run.spec.stages if s.method == "eval"]
    assert [(s.name, s.from_) for s in evals] == [(f"eval-{v}", v) for v in VARIANTS] + [("eval-simpo", "simpo")]
    assert run.expansion["eval-simpo"].evaluates == "simpo" and run.expansion["eval-simpo"].of == "eval"
    # sft starts from the base model, the variants from sft: no one reference unless named
    said = _refusal(_sweep_doc(lambda s: s[2]["eval"].update(stages=["sft", "dpo"])))
    assert "spec.stages[2].eval.reference: the stages eval evaluates start from different models (sft, spec.model)" \
        in said
    assert "eval.stages: 'nope' is not an earlier stage" in _refusal(
        _sweep_doc(lambda s: s[2]["eval"].update(stages=["dpo", "nope"])))


def test_suspend_stops_every_running_sibling_and_resume_restarts_them():
    shell = Shell()
    shell.step()
    shell.end("sft", "Succeeded", at(10), result=ok())
    shell.step(at(10))
    shell.spec = {"suspend": True}
    out = shell.step(at(20))
    suspended = sorted(a.stage for a in out.actions if isinstance(a, SetSuspend) and a.suspend)
    assert suspended == VARIANTS and out.status.phase == "Suspended"
    assert {s.name for s in out.status.stages if s.phase == "Suspended"} == set(VARIANTS)
    for v in VARIANTS:  # the Jobs say they are suspended now
        c = shell.children[v]
        shell.children[v] = ObservedChild(v, c.name, "Running", 1, created=c.created, suspended=True)
    shell.spec = {}
    out = shell.step(at(30))
    assert sorted(a.stage for a in out.actions if isinstance(a, SetSuspend) and not a.suspend) == VARIANTS
    assert out.status.phase == "Running" and out.status.progress_summary == "1/7, 3 running"
