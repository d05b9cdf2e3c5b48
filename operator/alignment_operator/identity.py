"""A child's identity: the names, labels and hash by which a run's children are created, found and
told apart. Pure. Render builds objects with these, reconcile names the Job a stage's status points at,
observe and the shells (kube, cache, handlers, local runner, progress server) select and read children
by them; none of those needs the renderer for it.

Names are deterministic and injective: `<run>-<stage>-<hash of both>[suffix]`, within a DNS label.
Membership is by the controller ownerReference (kube.py), the labels only narrow a watch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .api import AlignmentRun

MANAGED_BY = "alignment-operator"
LABEL_RUN = "alignment.dev/run"
LABEL_STAGE = "alignment.dev/stage"
ANNOTATION_HASH = "alignment.dev/stage-hash"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
NAME_HASH_LENGTH = 6


def child_name(run: AlignmentRun, stage: str, suffix: str = "", limit: int = 63) -> str:
    """The name of a stage's child: see stage_child_name."""
    return stage_child_name(run.metadata.name, stage, suffix, limit)


def stage_child_name(run: str, stage: str, suffix: str = "", limit: int = 63) -> str:
    """<run>-<stage>-<hash>[suffix]: readable, and injective across runs: the hash is of the pair
    (run, stage), so run `a-b` with stage `x-sft` and run `a-b-x` with stage `sft` get different
    names (`<run>-<stage>` alone is the same for both). The readable part is cut to stay within
    `limit` (a DNS label: 63); the hash still tells any two pairs apart."""
    digest = hashlib.sha256(f"{run}\0{stage}".encode()).hexdigest()[:NAME_HASH_LENGTH]
    room = limit - len(suffix) - NAME_HASH_LENGTH - 1
    readable = f"{run}-{stage}"[:room].rstrip("-.")
    return f"{readable}-{digest}{suffix}"


def workspace_claim(run: AlignmentRun) -> str:
    """The run's volume: spec.storage.claimName, or the claim the operator creates for it."""
    return run.spec.storage.claim_name or f"{run.metadata.name}-workspace"


def labels(run: AlignmentRun, stage: str | None = None) -> dict[str, str]:
    out = {LABEL_RUN: run.metadata.name, "app.kubernetes.io/managed-by": MANAGED_BY}
    if stage is not None:
        out[LABEL_STAGE] = stage
    if run.spec.queue_name:
        out[KUEUE_QUEUE] = run.spec.queue_name
    return out


def owner_reference(run: AlignmentRun) -> dict[str, Any]:
    return {"apiVersion": run.api_version, "kind": run.kind, "name": run.metadata.name,
            "uid": (run.metadata.model_extra or {}).get("uid", ""), "controller": True,
            "blockOwnerDeletion": True}


def attempt_spec(run: AlignmentRun, index: int) -> dict[str, Any]:
    """What a stage runs, as its attempt pins it (status.stages[].attemptSpec): its own spec and the
    model it starts from."""
    return {"stage": run.spec.stages[index].wire(), "model": run.spec.model.wire() if index == 0 else None}


def stage_hash(run: AlignmentRun, index: int) -> str:
    """Fingerprint of what a stage runs (the child's ANNOTATION_HASH): its own spec and the model it starts from."""
    return spec_hash(attempt_spec(run, index))


def spec_hash(pinned: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:16]
