"""Issue 26 on a real node: examples/tiny-sweep.yaml (SFT -> three DPO variants, a matrix over beta ->
one eval comparing them) under the operator, each stage a Job whose pod runs the trainer image.

What only real pods show: the three variants' pods running at the same time (their containers' start
and finish times overlap), the reference log-probs computed by one variant and read back from the run's
volume by the other two (each pod's own `reference_logps` line), and the comparison in the run's status,
`kubectl get` (GPU-H column) and `kubectl describe`."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
import yaml

from controlplane import REPO
from realnode import events, one_thread, prepare_volume, start_operator, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]
VARIANTS = ["dpo-0-01", "dpo-0-1", "dpo-0-5"]


def _t(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def test_tiny_sweep_variants_run_side_by_side_share_the_reference_and_are_compared(real, restricted_ns, tmp_path):
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    prepare_volume(real, ns, "tiny-sweep")
    doc = one_thread(yaml.safe_load((REPO / "examples" / "tiny-sweep.yaml").read_text()))
    for stage in doc["spec"]["stages"]:  # three DPO (then eval) pods fit the 2-core node side by side;
        # sft runs alone: both cores (a pod's CPU limit is its request: at 500m its start-up crawled)
        stage["resources"].update(cpu="2" if stage["name"] == "sft" else "650m", memory="2Gi")
    operator = start_operator(real, ns, tmp_path)
    try:
        plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        run = wait_phase(real, ns, "tiny-sweep", {"Succeeded", "Failed"}, timeout=1500)
        table = plane.kubectl("get", "alignmentruns", "-n", ns).stdout
        described = plane.kubectl("describe", "alignmentrun", "tiny-sweep", "-n", ns).stdout
    finally:
        operator.stop()
    wall = time.monotonic() - started
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    stages = {s["name"]: s for s in status["stages"]}
    assert set(stages) == {"sft", *VARIANTS, *(f"eval-{v}" for v in VARIANTS)}

    # The variants' pods ran at the same time: each container's run overlaps the others'.
    pods = json.loads(plane.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    spans = {}
    for pod in pods:
        stage = pod["metadata"]["labels"].get("alignment.dev/stage")
        term = (pod["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("terminated")
        if stage in VARIANTS and term:
            spans[stage] = (_t(term["startedAt"]), _t(term["finishedAt"]))
    assert set(spans) == set(VARIANTS), spans
    latest_start = max(s for s, _ in spans.values())
    earliest_end = min(e for _, e in spans.values())
    assert latest_start < earliest_end, f"the three DPO pods never ran at once: {spans}"

    # The reference pass ran once: one variant computed the log-probs, the other two read them back.
    said = {}
    for v in VARIANTS:
        logs = plane.kubectl("logs", "-n", ns, f"job/{stages[v]['jobName']}").stdout
        said[v] = next(e["reference_logps"] for e in events(logs) if e["event"] == "reference_logps"
                       and "reference_logps" in e)
    assert sorted(said.values()) == ["computed", "reused", "reused"], said

    # The eval compared all three; kubectl shows it.
    rows = status["comparison"]
    assert [r["stage"] for r in rows if r["best"]] and len(rows) == 3
    assert {r["stage"]: r["matrix"]["beta"] for r in rows} == {"dpo-0-01": 0.01, "dpo-0-1": 0.1, "dpo-0-5": 0.5}
    assert all("preference_accuracy" in r["metrics"] for r in rows)
    assert stages["dpo-0-1"]["gpus"] == 0 and stages["dpo-0-1"]["wallSeconds"] > 0  # CPU-only, said so
    header = table.splitlines()[0].split()
    assert "GPU-H" in header and "Succeeded" in table.splitlines()[1]
    assert "Comparison:" in described and "Variant Of:" in described
    start = described.index("Comparison:")
    print(f"\nissue 26 on the node: tiny sweep {wall:.0f}s; DPO pods (container start, finish) {json.dumps(spans)}; "
          f"reference {said}; best {[r['stage'] for r in rows if r['best']]}\n{table}\n{described[start:start + 1500]}")
