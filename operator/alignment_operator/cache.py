"""What the operator has seen of its runs and their children, fed by its watches (kopf events),
so a reconcile reads memory instead of listing Jobs and pods from the API server each time.

Thread-safe: kopf runs the sync handlers in a thread pool. Runs are the watch's plain dicts,
stored as received (never mutated); children and pods only as much as observe.py reads of
them (observe.slim: a thousand runs' pods and Jobs in full would be most of the operator's memory). A child this cache has not seen yet (the operator just
started and its Job watch has not listed yet) is covered by the caller: see controller.py.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from .observe import slim
from .render.manifests import LABEL_RUN

Key = tuple[str, str]  # (namespace, run name)


class Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Key, dict[str, Any]] = {}
        self._children: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)  # uid -> Job/JobSet/PyTorchJob
        self._pods: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)      # uid -> Pod

    # ------------------------------------------------------------------------------ runs

    def put_run(self, obj: dict[str, Any]) -> None:
        """Keep the newest version seen (a watch event can arrive after our own write's reply),
        without its managedFields (as large as the spec, and never read)."""
        meta = obj["metadata"]
        if "managedFields" in meta:
            obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
        key = (meta["namespace"], meta["name"])
        with self._lock:
            old = self._runs.get(key)
            if old is None or _newer(obj, old):
                self._runs[key] = obj

    def run(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._runs.get((namespace, name))

    def forget_run(self, namespace: str, name: str) -> None:
        with self._lock:
            self._runs.pop((namespace, name), None)

    # ------------------------------------------------------------------------------ children

    def put(self, obj: dict[str, Any], deleted: bool = False) -> Key | None:
        """A child or a pod from a watch event; returns its run's key (None without the run label)."""
        meta = obj["metadata"]
        run = (meta.get("labels") or {}).get(LABEL_RUN)
        if run is None:
            return None
        key = (meta["namespace"], run)
        store = self._pods if obj.get("kind") == "Pod" else self._children
        with self._lock:
            if deleted:
                store[key].pop(meta["uid"], None)
            elif meta["uid"] not in store[key] or _newer(obj, store[key][meta["uid"]]):
                store[key][meta["uid"]] = slim(obj)
        return key

    def children(self, namespace: str, run: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(Jobs/JobSets/PyTorchJobs, pods) labelled with the run."""
        with self._lock:
            return list(self._children[(namespace, run)].values()), list(self._pods[(namespace, run)].values())


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """resourceVersions are opaque, but etcd's are integers; compare them as such when they are."""
    ra, rb = a["metadata"].get("resourceVersion", ""), b["metadata"].get("resourceVersion", "")
    if ra.isdigit() and rb.isdigit():
        return int(ra) >= int(rb)
    return True
