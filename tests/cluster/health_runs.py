"""Two more runs for the health scenario on the real node (tests/cluster/test_health_real_node.py, issue 31),
applied while the frozen-rank run waits out its hang timeout (its two pods idle then: rank 1 stopped, rank 0
blocked in a collective), so they cost no node start and little wall time:

- `ties`: a GRPO stage whose one reward returns the same value for every completion (a format rule that
  every text matches: 1.0): every group's rewards tie, the trainer reports it after guards.steps logging
  steps, and status shows Degraded with the figure while the stage runs on (not fatal by default);
- `slow`: a DPO stage with precomputed reference log-probs over enough pairs that building its trainer
  (tokenizing and the reference pass) takes longer than its hangTimeoutSeconds: a slow but healthy phase,
  not restarted.

Neither asks for CPU (the node's two cores are the frozen-rank run's requests): they run beside it, starved
while the restarted hang run's two Guaranteed pods compute (a pod that requests no CPU gets cgroup weight 1
against their 39 each: ~1/79 of the node). A starved stage is a slow one: in one CI run `slow`'s few training
steps, starved so, reported nothing for 16 s, and with hangTimeoutSeconds 15 that was a Hang by its own
recipe. So `slow` trains 2 steps after its reference pass, with a hang timeout twice the longest gap seen.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from controlplane import REPO
from kubelet import get_run
from realnode import one_stage_run

TIE_STEPS = 2        # stages[].guards.steps of `ties`: Degraded after this many logging steps
SLOW_HANG_S = 30     # `slow`'s hangTimeoutSeconds; its reference pass must last longer
SLOW_COPIES = 35     # examples/data/prefs.jsonl (400 pairs) this many times: a ~38 s reference pass on the idle node (27 s for 25)
NO_CPU = {"gpusPerNode": 0, "processesPerNode": 1, "memory": "3Gi", "sharedMemory": "256Mi"}


def constant_reward_run(name: str = "ties") -> dict:
    return one_stage_run(name, {
        "name": "grpo", "method": "grpo", "datasets": [{"source": "examples/data/prompts.jsonl"}],
        "grpo": {"rewards": [{"kind": "format", "pattern": "^"}],  # every completion matches: 1.0, always
                 "numGenerations": 4, "maxCompletionLength": 8, "temperature": 1.0},
        "guards": {"steps": TIE_STEPS},
        "training": {"maxSteps": 60, "learningRate": 1.0e-4, "beta": 0.01, "perDeviceBatchSize": 8, "maxLength": 48,
                     "maxPromptLength": 32, "gradientCheckpointing": False, "saveSteps": 1000, "loggingSteps": 1,
                     "warmupRatio": 0.0},
        "resources": NO_CPU, "distributed": "ddp"})


def slow_precompute_run(volume: Path, name: str = "slow") -> dict:
    """Writes the many pairs onto the run's volume; the run reads them."""
    rows = (REPO / "examples/data/prefs.jsonl").read_text().splitlines()
    many = volume / "examples/data/many_prefs.jsonl"
    many.write_text("\n".join(rows * SLOW_COPIES) + "\n")
    os.chown(many, 1000, 1000)
    return one_stage_run(name, {
        "name": "dpo", "method": "dpo", "datasets": [{"source": "examples/data/many_prefs.jsonl"}],
        "hangTimeoutSeconds": SLOW_HANG_S,
        "training": {"precomputeRefLogProbs": True, "maxSteps": 2, "beta": 0.1, "learningRate": 5.0e-4,
                     "perDeviceBatchSize": 16, "maxLength": 128, "maxPromptLength": 64, "gradientCheckpointing": False,
                     "saveSteps": 1, "loggingSteps": 1, "warmupRatio": 0.0},
        "resources": NO_CPU, "distributed": "ddp"})


def volume_like(real, ns: str, run: str, volume: Path) -> Path:
    """The run's volume with what `volume` (a prepare_volume) holds: the tiny model and examples/data."""
    mine = real.node.workspace(ns, run)
    for part in ("runs", "examples"):
        shutil.copytree(volume / part, mine / part)
    for path in [mine, *mine.rglob("*")]:
        os.chown(path, 1000, 1000)
    return mine


class FirstDegraded(threading.Thread):
    """Polls a run every second from its apply on and keeps the first status with Degraded True (`seen`) and the
    seconds since the apply (`after`): a GRPO stage of a few seconds must be caught while it runs."""

    def __init__(self, plane, ns: str, name: str, timeout: float = 600):
        super().__init__(daemon=True)
        self.api, self.ns, self.name, self.timeout = plane.api_client(), ns, name, timeout
        self.seen: dict | None = None
        self.after: float | None = None
        self.started = time.monotonic()

    def run(self):
        while self.seen is None and time.monotonic() - self.started < self.timeout:
            try:
                r = get_run(self.api, self.ns, self.name)
            except Exception:  # noqa: BLE001 - not there yet, a slow API server: poll again
                r = {}
            if any(c["type"] == "Degraded" and c["status"] == "True" for c in r.get("status", {}).get("conditions", [])):
                self.seen, self.after = r, time.monotonic() - self.started
            time.sleep(1)


def check_ties(degraded: dict, done: dict, out: Path, events: list[dict]) -> str:
    """`ties` said Degraded, with the figure, after TIE_STEPS logging steps, and ran on to Succeeded."""
    st = degraded["status"]["stages"][0]
    figure = f"100% of GRPO groups' rewards tie (frac_reward_zero_std 1.00 above 0.9 for {TIE_STEPS} logging steps)"
    # the tiny stage trains in seconds and pushes at most every 5 s: the first look that shows the figure
    # is often its last push, while Running, and sometimes the end of the stage
    assert st["phase"] in ("Running", "Succeeded") and any(figure in w for w in st["warnings"]), st.get("warnings")
    assert st["progress"]["degradedRewardTies"] == 1.0, st["progress"]
    # nothing to learn from, so no gradient either (beta's KL term is 0 while the policy is the reference)
    assert any(f"gradient norm 0 (at most 0) for {TIE_STEPS} logging steps" in w for w in st["warnings"]), st
    cond = next(c for c in degraded["status"]["conditions"] if c["type"] == "Degraded")
    assert cond["reason"] == "LearningNothing" and f"stage grpo: {figure}" in cond["message"], cond
    assert any("stage grpo: " in e["message"] and figure in e["message"] for e in events), events
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tied = [r["step"] for r in rows if r.get("frac_reward_zero_std") == 1.0]
    said = [r["step"] for r in rows if "degraded/reward_ties" in r]
    assert tied[:TIE_STEPS] == list(range(1, TIE_STEPS + 1)) and said[0] == TIE_STEPS, (tied, said)
    assert done["status"]["phase"] == "Succeeded", done["status"]  # a warning, not fatal, by default
    return (f"Degraded at step {said[0]} (guards.steps {TIE_STEPS}), status showed it at step "
            f"{st['progress'].get('step')}: {cond['message']}")


def check_slow(done: dict, out: Path) -> float:
    """`slow` spent longer than its hangTimeoutSeconds before its first step (the reference pass) and was not
    restarted; returns that phase's seconds."""
    st = done["status"]["stages"][0]
    assert done["status"]["phase"] == "Succeeded", st
    assert not st.get("restarts") and not st.get("restartReasons") and st.get("attempts", 1) == 1, st
    result = json.loads((out / "result.json").read_text())
    phase = result["reference_pass_s"]
    assert result["reference_logps"] == "computed" and phase > SLOW_HANG_S, result
    return phase
