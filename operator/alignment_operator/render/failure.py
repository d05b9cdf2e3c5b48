"""A stage's failure policy, and the failure kinds it yields. Pure.

Failure semantics (Kubernetes' "Pod failure policy" and JobSet's failure-policy recipes):
pods never restart in place (restartPolicy Never) and a replacement starts only once the old
pod is gone (podReplacementPolicy Failed: two pods never hold one stage's GPUs and checkpoint
directory). The trainer's exit code 2 (outcome.FIX_INPUT: fix the input, a retry cannot help)
fails the stage at once. A disruption (the pod's DisruptionTarget condition: preemption,
Eviction API, node drain, taint eviction) never counts against backoffLimit:
- one node: the Job ignores it and starts a new pod, which resumes from the newest checkpoint;
- JobSet: the Job fails at once and the JobSet restarts every rank without counting
  (RestartJobSetAndIgnoreMaxRestarts); other failures restart every rank, counted up to
  maxRestarts = backoffLimit;
- Indexed Job: one rank alone can never rejoin the others' rendezvous, so the Job fails on
  any rank's failure (backoffLimit 0, disruption included) and the operator restarts the
  whole group; `failure_kind` tells it from the Job's Failed condition whether to count it.
"""

from __future__ import annotations

from typing import Any

from alignment_trainer.outcome import FIX_INPUT


def pod_failure_policy(container: str, disruption: str) -> dict[str, Any]:
    """batch/v1 podFailurePolicy: exit code FIX_INPUT fails the Job at once; a disruption is
    `disruption` (Ignore: not counted, the pod is replaced; FailJob: the Job fails at once so
    the whole group restarts). Rule order matters: `failure_kind` reads the rule index."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [FIX_INPUT]}},
        {"action": disruption, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def failure_kind(reason: str | None, message: str | None) -> str:
    """What a stage Job's Failed condition means, by the policy above:
    'input' (exit code FIX_INPUT: fail the stage, never retry), 'disruption' (restart without
    counting an attempt) or 'failure' (counts against backoffLimit).

    The Job controller writes reason PodFailurePolicy and a message naming the matched rule,
    "... matching FailJob rule at index N" (kubernetes pkg/controller/job/pod_failure_policy.go)."""
    if reason == "PodFailurePolicy" and message:
        if "has condition DisruptionTarget matching" in message:
            return "disruption"
        if f"failed with exit code {FIX_INPUT} matching FailJob rule at index 0" in message:
            return "input"
    return "failure"


def job_failure_fields(container: str, backoff_limit: int, disruption: str) -> dict[str, Any]:
    return {"backoffLimit": backoff_limit, "podReplacementPolicy": "Failed",
            "podFailurePolicy": pod_failure_policy(container, disruption)}


def jobset_failure_policy(backoff_limit: int) -> dict[str, Any]:
    """JobSet's failurePolicy over child Jobs that fail at once (backoffLimit 0, the podFailurePolicy
    above with FailJob on disruption). Rules are tried in order; the first match acts."""
    return {
        "maxRestarts": backoff_limit,
        # Every old pod is gone before the new ranks start: no rank of the previous attempt can
        # join the new rendezvous or write to the checkpoint directory.
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": ["has condition DisruptionTarget matching FailJob rule"]},
            {"name": "FixInput", "action": "FailJobSet",
             "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [f"failed with exit code {FIX_INPUT} matching FailJob rule"]},
            {"name": "Failure", "action": "RestartJobSet"},  # counted against maxRestarts
        ],
    }
