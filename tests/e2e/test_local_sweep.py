"""`alignctl run --local examples/tiny-sweep.yaml` end to end (issue 26): SFT -> DPO variants (a matrix
over beta; two here, the example's three cost a stage process each) -> one eval comparing them. The variants run side by side (bounded by the cores), the
reference log-probs are computed once and read back by the others, one branch killed mid-run fails alone
(its siblings and the other variants' evals finish; the run ends Failed naming it), and running the same
command again retries that branch only, ending with the comparison table and its plot. With spec.promote
(chooseBy reward_margin, an export to a real S3-compatible server when tests/s3server.py's versitygw is
built): nothing ships from the failed run; the rerun promotes the variant with the best reward margin,
marks it in the comparison and exports that variant's final/ (its card listing the URI)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_local_run import REPO, start, status_of, wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s3server  # noqa: E402

VARIANTS = ["dpo-0-01", "dpo-0-1"]


def sweep_file(directory: Path, model: Path, endpoint: str | None = None) -> Path:
    """The example with local paths, two betas, and spec.promote (an export when `endpoint`, the S3 server's)."""
    doc = yaml.safe_load((REPO / "examples" / "tiny-sweep.yaml").read_text())
    doc["spec"]["promote"] = {"chooseBy": "reward_margin"}  # preference_accuracy ties at this scale
    if endpoint:
        doc["spec"]["objectStore"] = {"endpointUrl": endpoint}
        doc["spec"]["promote"]["exports"] = [{"uri": "s3://exports/sweep"}]
    doc["spec"]["model"]["source"] = str(model)
    for stage in doc["spec"]["stages"]:
        for d in stage.get("datasets", []):
            d["source"] = str(REPO / d["source"])
    doc["spec"]["stages"][1]["training"]["maxSteps"] = 20  # ~10 s of training: time to kill one mid-way
    doc["spec"]["stages"][1]["matrix"]["beta"] = [0.01, 0.1]
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pid_of(recipe: Path) -> int | None:
    """The pid of the stage process this test's run started for `recipe` (its argv names it)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(recipe).encode() in argv and b"alignment_trainer" in argv:
                return int(proc.name)
    return None


def training(log: Path) -> bool:
    """The stage started training (its reference pass is behind it)."""
    return log.is_file() and any(line.startswith('{"event": "start"')
                                 for line in log.read_text(errors="replace").splitlines())


def reference_events(run_dir: Path) -> list[str]:
    out = []
    for v in VARIANTS:
        for line in (run_dir / v / "log.txt").read_text(errors="replace").splitlines():
            if '"reference_logps"' in line and line.startswith("{"):
                ev = json.loads(line)
                if ev.get("event") == "reference_logps" and ev.get("reference_logps") in ("computed", "reused"):
                    out.append(f"{v}:{ev['reference_logps']}")
    return out


def spans(status: dict) -> dict[str, tuple[float, float]]:
    from datetime import datetime

    def t(s: str) -> float:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    return {s["name"]: (t(s["startTime"]), t(s["completionTime"])) for s in status["stages"]
            if s.get("startTime") and s.get("completionTime")}


@pytest.mark.trainer
def test_sweep_runs_variants_side_by_side_a_killed_branch_fails_alone_and_a_rerun_retries_it(tmp_path, tiny_model):
    s3 = s3server.S3Server(tmp_path / "s3").start() if s3server.binary() else None
    if s3 is not None:
        s3.make_bucket("exports")
    run_file = sweep_file(tmp_path, tiny_model, s3.endpoint if s3 else None)
    env = s3.env() if s3 else {}
    try:
        _sweep(tmp_path, run_file, env, s3)
    finally:
        if s3 is not None:
            s3.stop()


def _sweep(tmp_path: Path, run_file: Path, env: dict, s3) -> None:
    workdir = tmp_path / "runs"
    run_dir = workdir / "default" / "tiny-sweep"
    t0 = time.monotonic()
    started = start(run_file, workdir, env)
    victim = run_dir / "dpo-0-1"
    deadline = time.monotonic() + 600
    while not training(victim / "log.txt"):  # kill it once it trains: its reference pass is behind it
        assert started[0].poll() is None, started[1].read_text()[-3000:]
        assert time.monotonic() < deadline, "dpo-0-1 never started training"
        time.sleep(0.2)
    pid = pid_of(victim / "recipe.yaml")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    code, out = wait(started)
    first_s = time.monotonic() - t0
    status = status_of(run_dir)
    phases = {s["name"]: s["phase"] for s in status["stages"]}
    assert code == 1, out[-3000:]
    assert phases == {"sft": "Succeeded", "dpo-0-01": "Succeeded", "dpo-0-1": "Failed",
                      "eval-dpo-0-01": "Succeeded", "eval-dpo-0-1": "Pending"}
    blocked = next(s for s in status["stages"] if s["name"] == "eval-dpo-0-1")
    assert blocked["reason"] == "InputFailed" and "dpo-0-1" in blocked["message"]
    assert status["phase"] == "Failed" and "stage dpo-0-1 failed" in out
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "dpo-0-1" in failed["message"] and "exit code -9" in failed["message"]
    # The variants ran side by side: two at once on these cores (slots), never three.
    sp = spans(status)
    first_two = sorted(VARIANTS, key=lambda v: sp[v][0])[:2]
    assert sp[first_two[0]][0] == sp[first_two[1]][0] == sp["sft"][1]  # both started when sft finished
    slots = max(1, int(os.cpu_count() or 1))
    overlapping = max(sum(1 for s, e in sp.values() if s <= t < e) for t in {s for s, _ in sp.values()})
    assert 2 <= overlapping <= max(2, slots), sp
    # The comparison holds the finished variants; the killed one has no metrics yet.
    rows = {r["stage"]: r for r in status["comparison"]}
    assert set(rows) == set(VARIANTS) and rows["dpo-0-1"]["metrics"] == {}
    assert rows["dpo-0-01"]["matrix"] == {"beta": 0.01} and "preference_accuracy" in rows["dpo-0-01"]["metrics"]
    assert next(s for s in status["stages"] if s["name"] == "dpo-0-01")["gpus"] == 0  # CPU-only, said so
    assert status.get("promotion") is None  # a failed run promotes nothing
    if s3 is not None:
        assert s3.client().list_objects_v2(Bucket="exports").get("KeyCount", 0) == 0

    t1 = time.monotonic()
    code, out = wait(start(run_file, workdir, env))
    rerun_s = time.monotonic() - t1
    assert code == 0, out[-3000:]
    started_now = [line for line in out.splitlines() if line.startswith("- stage") and line.endswith("started")]
    assert started_now == ["- stage dpo-0-1 (dpo) started", "- stage eval-dpo-0-1 (eval) started"], out
    assert "succeeded earlier" in out
    status = status_of(run_dir)
    assert status["phase"] == "Succeeded" and len(status["comparison"]) == 2
    assert all("preference_accuracy" in r["metrics"] for r in status["comparison"])
    assert sum(r["best"] for r in status["comparison"]) == 1
    assert "comparison (best first" in out and (run_dir / "comparison.png").is_file()
    # The reference log-probs: computed once, read back by every other variant (the killed one's rerun too).
    events = reference_events(run_dir)
    assert sum(e.endswith(":computed") for e in events) == 1, events
    assert sum(e.endswith(":reused") for e in events) >= 2, events  # the sibling, and the rerun
    # The variant with the best reward margin is promoted, marked, and the one exported.
    best = max(status["comparison"], key=lambda r: r["metrics"]["reward_margin"])
    p = status["promotion"]
    assert (p["verdict"], p["stage"], p["matrix"], p["chosenBy"]) == ("Promoted", best["stage"], best["matrix"],
                                                                     "reward_margin"), p
    assert [r["stage"] for r in status["comparison"] if r["promoted"]] == [best["stage"]]
    assert status["model"] == str(run_dir / best["stage"] / "final") and f"PROMOTION: Promoted {best['stage']}" in out
    if s3 is not None:
        assert p["exports"][0]["uri"] == "s3://exports/sweep" and p["exports"][0]["digest"].startswith("sha256:")
        client = s3.client()
        weights = client.get_object(Bucket="exports", Key="sweep/model.safetensors")["Body"].read()
        other = next(v for v in VARIANTS if v != best["stage"])
        assert weights == (run_dir / best["stage"] / "final" / "model.safetensors").read_bytes()
        assert weights != (run_dir / other / "final" / "model.safetensors").read_bytes()
        card = client.get_object(Bucket="exports", Key="sweep/README.md")["Body"].read().decode()
        assert "- `s3://exports/sweep`" in card and f"eval-{best['stage']}" in card
    print(f"first run (killed branch) {first_s:.0f} s, rerun {rerun_s:.0f} s; reference: {events}; "
          f"promoted {p['stage']}")
