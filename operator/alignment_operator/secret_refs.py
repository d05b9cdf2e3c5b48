"""The Secrets a stage's pods will read, and what of them is missing. Pure: no I/O.

Read off the pod template render makes for the stage (so exactly what the kubelet will look up):
env valueFrom.secretKeyRef (a key), envFrom secretRef (the whole Secret), secret volumes and
projected secret sources (their items' keys, else the whole Secret). Optional references are left
out: the kubelet starts the pod without them. The cluster shell reads the Secrets' key names
(never a value into status, events or logs) when a stage is about to start, and reconcile holds
the run with what `missing` says: a stage whose pod would sit in CreateContainerConfigError (a
judge key read only by the last stage, after hours of training) is named before any GPU is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SecretUse:
    secret: str
    key: str | None  # None: the Secret as a whole (envFrom, a volume without items)
    what: str        # how the pod reads it: "env HF_TOKEN", "envFrom", "volume creds"


def secret_uses(pod_spec: dict[str, Any]) -> list[SecretUse]:
    """The Secrets a pod spec needs to start, each once per (Secret, key), in the spec's order."""
    uses: list[SecretUse] = []
    for container in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                uses.append(SecretUse(ref["name"], ref["key"], f"env {env['name']}"))
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if ref and not ref.get("optional"):
                uses.append(SecretUse(ref["name"], None, "envFrom"))
    for volume in pod_spec.get("volumes") or []:
        sources = [("secret", volume["secret"])] if volume.get("secret") else []
        sources += [("projected", s["secret"]) for s in (volume.get("projected") or {}).get("sources") or []
                    if s.get("secret")]
        for kind, ref in sources:
            name = ref.get("secretName") if kind == "secret" else ref.get("name")
            if not name or ref.get("optional"):
                continue
            keys = [item["key"] for item in ref.get("items") or []] or [None]
            uses += [SecretUse(name, key, f"volume {volume['name']}") for key in keys]
    seen: set[tuple[str, str | None]] = set()
    return [u for u in uses if (u.secret, u.key) not in seen and not seen.add((u.secret, u.key))]


def missing(uses: list[SecretUse], keys: dict[str, set[str] | None], namespace: str) -> list[str]:
    """What of `uses` the Secrets as read (`keys`: name -> its key names, None: no such Secret) lack,
    one line each, with the command that makes it. A Secret not in `keys` was not read: not counted."""
    lines = []
    for use in uses:
        if use.secret not in keys:
            continue
        have = keys[use.secret]
        literal = f"--from-literal={use.key}=..." if use.key else "--from-literal=KEY=..."
        if have is None:
            lines.append(f"Secret {use.secret} ({use.what}{f', key {use.key}' if use.key else ''}) is not in "
                         f"namespace {namespace}: kubectl create secret generic {use.secret} -n {namespace} {literal}")
        elif use.key is not None and use.key not in have:
            lines.append(f"Secret {use.secret} has no key {use.key} ({use.what}; its keys: "
                         f"{', '.join(sorted(have)) or 'none'}): add it, or name one of its keys")
    return lines
