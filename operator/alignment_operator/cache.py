"""What the operator has seen of its runs and their children, fed by its watches (kopf events),
so a reconcile reads memory instead of listing Jobs and pods from the API server each time.

Thread-safe: kopf runs the sync handlers in a thread pool. Runs are the watch's plain dicts,
stored as received (never mutated); children and pods only as much as observe.py reads of
them (observe.slim: a thousand runs' pods and Jobs in full would be most of the operator's memory). A child this cache has not seen yet (the operator just
started and its Job watch has not listed yet) is covered by the caller: see controller.py.
"""

from __future__ import annotations

import threading
from typing import Any

from .observe import slim
from .identity import LABEL_RUN

Key = tuple[str, str]  # (namespace, run name)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class Cache:
    """Bounded by the runs that exist: a deleted run's entries go with it (`drop`), and a finished
    run keeps no children (`finish`: their events are ignored until a reconcile lists them again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Key, dict[str, Any]] = {}
        self._children: dict[Key, dict[str, dict[str, Any]]] = {}  # uid -> Job/JobSet/PyTorchJob
        self._pods: dict[Key, dict[str, dict[str, Any]]] = {}      # uid -> Pod
        self._finished: set[Key] = set()

    # ------------------------------------------------------------------------------ runs

    def put_run(self, obj: dict[str, Any]) -> bool:
        """Keep the newest version seen (a watch event can arrive after our own write's reply),
        without its managedFields nor kubectl's last-applied-configuration annotation (each as large
        as the spec, and never read). False when this version (or a newer one) is held already: the
        event of our own write is no news."""
        meta = obj["metadata"]
        annotations = meta.get("annotations") or {}
        if "managedFields" in meta or LAST_APPLIED in annotations:
            meta = {k: v for k, v in meta.items() if k != "managedFields"}
            if LAST_APPLIED in annotations:
                meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
            obj = {**obj, "metadata": meta}
        key = (meta["namespace"], meta["name"])
        with self._lock:
            old = self._runs.get(key)
            if old is not None and not _newer(obj, old):
                return False
            self._runs[key] = obj
            return True

    def run(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._runs.get((namespace, name))

    def forget_run(self, namespace: str, name: str) -> None:
        """The run's body only (it is read afresh next time); its children stay."""
        with self._lock:
            self._runs.pop((namespace, name), None)

    def drop(self, namespace: str, name: str) -> None:
        """Everything of a deleted run."""
        key = (namespace, name)
        with self._lock:
            self._runs.pop(key, None)
            self._children.pop(key, None)
            self._pods.pop(key, None)
            self._finished.discard(key)

    # ------------------------------------------------------------------------------ children

    def put(self, obj: dict[str, Any], deleted: bool = False) -> Key | None:
        """A child or a pod from a watch event; returns its run's key when that is news to the
        run (None: no run label, a finished run, or a version held already)."""
        meta = obj["metadata"]
        run = (meta.get("labels") or {}).get(LABEL_RUN)
        if run is None:
            return None
        key = (meta["namespace"], run)
        stores = self._pods if obj.get("kind") == "Pod" else self._children
        with self._lock:
            if key in self._finished:
                return None
            store = stores.get(key)
            if deleted:
                if store is None or store.pop(meta["uid"], None) is None:
                    return None
                if not store:
                    del stores[key]
                return key
            old = store.get(meta["uid"]) if store is not None else None
            if old is not None and not _newer(obj, old):
                return None
            stores.setdefault(key, {})[meta["uid"]] = slim(obj)
        return key

    def children(self, namespace: str, run: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(Jobs/JobSets/PyTorchJobs, pods) labelled with the run."""
        key = (namespace, run)
        with self._lock:
            return list(self._children.get(key, {}).values()), list(self._pods.get(key, {}).values())

    def replace_children(self, namespace: str, run: str, objects: list[dict[str, Any]],
                         pods: list[dict[str, Any]]) -> None:
        """What a list from the API server says the run has: anything else is gone (a deletion
        the watch missed)."""
        key = (namespace, run)
        with self._lock:
            self._finished.discard(key)
            for store, items in ((self._children, objects), (self._pods, pods)):
                if items:
                    store[key] = {o["metadata"]["uid"]: slim(o) for o in items}
                else:
                    store.pop(key, None)

    def finish(self, namespace: str, run: str) -> None:
        """The run finished: its children are no longer kept, nor their events taken."""
        key = (namespace, run)
        with self._lock:
            self._children.pop(key, None)
            self._pods.pop(key, None)
            if key in self._runs:
                self._finished.add(key)

    def finished(self, namespace: str, run: str) -> bool:
        with self._lock:
            return (namespace, run) in self._finished

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"runs": len(self._runs), "children": sum(map(len, self._children.values())),
                    "pods": sum(map(len, self._pods.values())), "finished": len(self._finished)}


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether `a` is a later version than `b`. resourceVersions are opaque, but etcd's are
    integers; compared as such when they are, else any other version counts as later."""
    ra, rb = a["metadata"].get("resourceVersion", ""), b["metadata"].get("resourceVersion", "")
    if ra.isdigit() and rb.isdigit():
        return int(ra) > int(rb)
    return ra != rb
