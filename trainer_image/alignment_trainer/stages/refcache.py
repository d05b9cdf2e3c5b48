"""Reference log-probs that outlive a stage, kept in recipe.cache_dir (the run volume's
cache/reference-logps/ for a rendered stage).

Training stages (DPO/IPO/KTO with precompute_ref_log_probs). TRL keys its own cache file by the
fingerprint of the tokenized dataset, which changes with the trainer's config (beta, output_dir)
and between processes, so no later stage finds it (trl#3985). CachedReference keys the log-probs
itself: by the rows and what else determines them (common.reference_cache/reference_key) and by
TRL's hash of the reference weights; a stage that asks for the same reads them back and runs no
reference pass; any change of the key computes them anew.

The eval stage's reference scores.

The eval stage scores held-out sequences under its reference (the model the evaluated stage
started from) with its own scorer (eval.sequence_logps). Two eval stages against the same
reference, or a rerun, score the same sequences again; here the scores are saved once, keyed by
the reference's identity and the exact token sequences scored (which fix the data, the chat
template, the truncation lengths and the tokenizer), and read back instead of a forward pass.

The reference's identity is its path and revision and, for a local directory, the name, size and
modification time of each weight and config file: a stage that rewrites its final/ (a rerun of
SFT) changes it, so scores of an older model are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..results import emit

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


def model_identity(path: str, revision: str) -> dict:
    """What names the reference's weights (see the module docstring)."""
    files = {}
    local = Path(path)
    if local.is_dir():
        for f in sorted(local.rglob("*")):
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
                st = f.stat()
                files[str(f.relative_to(local))] = [st.st_size, st.st_mtime_ns]
    return {"path": path, "revision": revision, "files": files}


def cache_key(identity: dict, seqs: list[tuple[list[int], list[int]]], dtype: str) -> str:
    digest = hashlib.sha256(json.dumps({"reference": identity, "dtype": dtype}, sort_keys=True).encode())
    for ids, mask in seqs:
        digest.update(json.dumps([ids, mask]).encode())
    return digest.hexdigest()[:32]


def reference_scores(cache_dir: str | None, identity: dict, dtype: str, seqs, compute, task: str):
    """compute() -> [(sum of log-probs, scored tokens)] for `seqs`, from the cache when present.
    Returns (scores, {"<task>": "computed" | "reused", "<task>_s": seconds})."""
    start = time.perf_counter()
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"eval-{cache_key(identity, seqs, dtype)}.json"
        if path.is_file():
            scores = [tuple(x) for x in json.loads(path.read_text())["scores"]]
            if len(scores) == len(seqs):
                info = {"reused": True, "seconds": round(time.perf_counter() - start, 3)}
                emit("reference_logps", task=task, cache=str(path), **info)
                return scores, info
    scores = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"reference": identity, "dtype": dtype, "scores": scores}))
        os.replace(tmp, path)
    info = {"reused": False, "seconds": round(time.perf_counter() - start, 3)}
    emit("reference_logps", task=task, cache=str(path) if path else None, **info)
    return scores, info


# ---------------------------------------------------------------------------- training stages

class CachedReference:
    """Mixin for TRL's DPOTrainer/KTOTrainer: _precompute_ref_logps reads the stage's log-probs from
    the shared cache when they are there, and writes them there when it computes them.

    reference_keys: the trainer's split name (train, eval) -> the key of its rows
    (common.reference_cache's file stem); reference_reuse records what happened per split.
    """

    def __init__(self, *args, reference_keys: dict[str, str] | None = None, **kwargs):
        self.reference_keys = reference_keys or {}
        self.reference_reuse: dict[str, bool] = {}
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        from accelerate.utils import broadcast_object_list
        from datasets import Dataset, concatenate_datasets

        stem = self.reference_keys.get(name)
        if stem is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # One name on every rank: rank 0's weight hash (ZeRO-3 shards the weights each rank hashes).
        weights = [self._precompute_model_hash]
        broadcast_object_list(weights, from_process=0)
        path = Path(self.reference_keys["dir"]) / f"{stem}-{weights[0][:16]}.logps.arrow"
        if path.is_file():
            cached = Dataset.from_file(str(path))
            if len(cached) == len(dataset):
                self.reference_reuse[name] = True
                return concatenate_datasets([dataset, cached], axis=1)
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        self.reference_reuse[name] = False
        if self.accelerator.is_main_process:
            columns = [c for c in out.column_names if c.startswith("ref_")]
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            from datasets.arrow_writer import ArrowWriter

            logps = out.select_columns(columns).flatten_indices()
            with ArrowWriter(path=str(tmp), features=logps.features) as writer:
                writer.write_table(logps.data.table)
                writer.finalize()
            os.replace(tmp, path)
        self.accelerator.wait_for_everyone()
        return out


def reference_keys(recipe, train_set, test_set) -> dict[str, str]:
    """The `reference_keys` of CachedReference for a stage's datasets from common.reference_cache."""
    keys = {}
    for name, dataset in (("train", train_set), ("eval", test_set)):
        if dataset is not None and dataset.cache_files:
            source = Path(dataset.cache_files[0]["filename"])
            keys[name], keys["dir"] = source.stem, str(source.parent)
    return keys


def reference_pass(trainer, seconds: float) -> dict:
    """result.json fields: whether the stage's reference log-probs were computed or reused, and how
    long building the trainer took (tokenizing, hashing the reference, and the pass when it ran)."""
    reuse = getattr(trainer, "reference_reuse", {})
    if not reuse:
        return {}
    info = {"reference_logps": "reused" if all(reuse.values()) else "computed",
            "reference_pass_s": round(seconds, 3)}
    if trainer.accelerator.is_main_process:
        emit("reference_logps", **info, splits=reuse)
    return info
