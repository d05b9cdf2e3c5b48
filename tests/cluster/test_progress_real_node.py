"""Live progress on the real node: a tiny run whose learning rate makes the loss NaN fails with
Diverged and the step. The stage pods' pushes to the operator's progress endpoint, the PROGRESS
column rising and a flood of the operator's ports are shown on the tiny run itself
(tests/cluster/test_real_node.py::test_tiny_run_sft_dpo_eval_in_real_pods): one run of the pipeline's
pods, not two.

Needs what tests/cluster/test_real_node.py needs (the node, the images); ALIGNMENT_SKIP_NODE=1
skips it.
"""

from __future__ import annotations

import time

import pytest
import yaml

from controlplane import REPO
from kubelet import apply_tiny, stage
from realnode import ONE_THREAD, prepare_volume, progress_operator, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]


def test_a_nan_loss_fails_the_stage_with_diverged_and_the_step(real, restricted_ns, tmp_path):
    ns, plane = restricted_ns, real.plane
    prepare_volume(real, ns, "tiny")
    operator = progress_operator(real, ns, tmp_path)
    try:
        stages = yaml.safe_load((REPO / "examples/tiny-run.yaml").read_text())["spec"]["stages"]
        stages[0]["training"].update(learningRate=1e4, loggingSteps=1)
        started = time.monotonic()
        apply_tiny(plane, ns, stages=stages, trainer={"env": ONE_THREAD})
        run = wait_phase(real, ns, "tiny", {"Failed", "Succeeded"}, timeout=600)
    finally:
        operator.stop()
    message = stage(run, "sft")["message"]
    assert run["status"]["phase"] == "Failed" and message.startswith("Diverged (exit code 2"), message
    assert "training diverged at step" in message, message
    print(f"\nNaN run failed after {time.monotonic() - started:.0f}s: {message}")
