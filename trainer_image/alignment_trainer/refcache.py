"""Reference log-probs that outlive a stage, kept in recipe.cache_dir (the run volume's
cache/reference-logps/ for a rendered stage).

Training stages (DPO/IPO/KTO with precompute_ref_log_probs). TRL keys its own cache file by the
fingerprint of the tokenized dataset, which changes with the trainer's config (beta, output_dir)
and between processes, so no later stage finds it (trl#3985). CachedReference keys the log-probs
itself: by the rows and what else determines them (training.reference_cache/reference_key), by the
reference's weights (weights_fingerprint), the truncation mode and the tokenizer's whole content
(tokenizer_fingerprint); a stage that asks for the same reads them back and runs no reference
pass; any change of the key computes them anew.

The weights are hashed by their values, never by a path: a reference replaced at the same path (a
rerun after its outputs were deleted, a directory overwritten in place, a Hub revision that moved)
is a new key. TRL 1.16's hash (trl/trainer/utils.py hash_module, stored as _precompute_model_hash
by DPOTrainer/KTOTrainer.__init__) hashes module.state_dict(), which under DeepSpeed ZeRO-3 holds
the empty placeholders of partitioned parameters: every model of one architecture hashes the same.
weights_fingerprint replaces it there (each partitioned parameter gathered in turn, hashed on rank 0)
and is TRL's hash byte for byte where nothing is partitioned.

The eval stage's reference scores.

The eval stage scores held-out sequences under its reference (the model the evaluated stage
started from) with its own scorer (eval.sequence_logps). Two eval stages against the same
reference, or a rerun, score the same sequences again; here the scores are saved once, keyed by
the reference's identity and the exact token sequences scored (which fix the data, the chat
template, the truncation lengths and the tokenizer), and read back instead of a forward pass.

The reference's identity is its path and revision and the name, size and modification time of each
weight and config file of its local directory or, for a Hub id, of the snapshot the revision
resolved to when the stage loaded it (its commit is in the snapshot's path; its files are links to
content-named blobs): a stage that rewrites its final/ (a rerun of SFT) or a Hub revision that
moved changes it, so scores of an older model are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .results import emit

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


def model_identity(path: str, revision: str) -> dict:
    """What names the reference's weights (see the module docstring)."""
    files = {}
    local = Path(path) if Path(path).is_dir() else hub_snapshot(path, revision)
    if local is not None:
        for f in sorted(local.rglob("*")):
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
                st = f.stat()  # a Hub snapshot's links: their blobs'
                files[str(f.relative_to(local))] = [st.st_size, st.st_mtime_ns]
    snapshot = None if local is None or Path(path).is_dir() else local.name
    return {"path": path, "revision": revision, "snapshot": snapshot, "files": files}


def hub_snapshot(repo_id: str, revision: str) -> Path | None:
    """The local snapshot directory (named by its commit) a Hub id at `revision` resolves to in the
    Hub cache, or None (not a Hub id, or not downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id: a path that does not exist
        return None
    return Path(found).parent if isinstance(found, str) else None


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
    (training.reference_cache's file stem); reference_reuse records what happened per split.
    """

    def __init__(self, *args, reference_keys: dict[str, str] | None = None, **kwargs):
        self.reference_keys = reference_keys or {}
        self.reference_reuse: dict[str, bool] = {}
        super().__init__(*args, **kwargs)  # TRL precomputes the reference log-probs here
        release_precompute_engine(self)

    def reference_fingerprint(self) -> dict:
        """The reference's weights, the truncation mode and the tokenizer, one value on every rank.

        Computed once, at the first precompute (in __init__, before any step: the policy is the
        reference then); TRL's _precompute_model_hash is replaced by the weights' hash, so TRL's own
        cache file is keyed by the real weights too."""
        if getattr(self, "_reference_fingerprint", None) is None:
            from accelerate.utils import broadcast_object_list

            start = time.perf_counter()
            model = self.ref_model or self.model
            weights = weights_fingerprint(model) if zero3_partitioned(model) else self._precompute_model_hash
            key = [{"weights": weights, "tokenizer": tokenizer_fingerprint(self.processing_class),
                    # KTOConfig has no truncation_mode: KTO's collator keeps the start.
                    "truncation_mode": getattr(self.args, "truncation_mode", "keep_start")}]
            broadcast_object_list(key, from_process=0)  # one name on every rank: rank 0's
            self._reference_fingerprint = key[0]
            self._precompute_model_hash = key[0]["weights"]
            self.reference_hash_s = round(time.perf_counter() - start, 3)
        return self._reference_fingerprint

    def _precompute_ref_logps(self, dataset, name, batch_size):
        key = self.reference_fingerprint()  # also right for TRL's own cache file (no stem)
        stem = self.reference_keys.get(name)
        if stem is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(self.reference_keys["dir"]) / f"{stem}-{digest}.logps.arrow"
        # Stages side by side that need the same log-probs (a sweep's variants) take turns: the first
        # computes them, the others wait here and read them back. Every rank waits for its rank 0.
        lock = KeyLock(path) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        try:
            return self._cached_ref_logps(dataset, name, batch_size, key, path)
        finally:
            if lock is not None:
                lock.release()

    def _cached_ref_logps(self, dataset, name, batch_size, key, path):
        from datasets import Dataset, concatenate_datasets

        if self.accelerator.is_main_process and not path.with_suffix(".json").is_file():
            # What decided these log-probs besides the rows' key, for a person reading the cache (not read back).
            path.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True))
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


def release_precompute_engine(trainer) -> None:
    """Remove the hooks of the DeepSpeed engine TRL's precompute wrapped the policy in (no ref_model:
    trl.models.prepare_deepspeed) once the log-probs are there; under ZeRO-3 they would stay on the
    model beside the training engine's, each fetching and releasing the modules' parameters by the
    trace its own coordinator records.

    Where the precompute ran a single batch per rank in all (a split of up to batch size x world rows
    computed, the other read from the cache or absent), that coordinator is left half way through
    recording its trace; the training engine renumbers the modules' ds_id, and at the first training
    step the old coordinator looks its recorded modules up by the new ids and the stage fails
    (IndexError: pop from an empty deque). TRL builds the engine again if a later precompute needs it."""
    engine = getattr(trainer, "_precompute_engine", None)
    if engine is not None and engine.zero_optimization_stage() == 3:  # ZeRO-1/2: a plain engine, no hooks
        engine.destroy()  # its hooks (DeepSpeedZeRoOffload.destroy); the weights stay partitioned
        trainer._precompute_engine = None


class KeyLock:
    """An exclusive flock on <cache file>.lock while one process computes (or reads) that entry; another
    stage that asks for the same entry blocks until it is there. Held by the stage's rank 0 only."""

    def __init__(self, path: Path):
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path.with_name(path.name + ".lock"), "a")
        start = time.perf_counter()
        fcntl.flock(self.file, fcntl.LOCK_EX)
        self.waited_s = round(time.perf_counter() - start, 3)
        if self.waited_s > 1:
            emit("reference_logps", waited_for_another_stage_s=self.waited_s, cache=str(path))

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def zero3_partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned any of the module's parameters (zero.Init at load)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def weights_fingerprint(module) -> str | None:
    """TRL 1.16's hash_module (trl/trainer/utils.py) over module.state_dict(), with each ZeRO-3
    partitioned parameter gathered whole first (deepspeed.zero.GatheredParameters, one at a time,
    every rank taking part); rank 0 hashes, the other ranks return None (broadcast rank 0's).
    Equal to hash_module(module) where nothing is partitioned."""
    import torch

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    params = dict(module.named_parameters(remove_duplicate=False))
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        param = params.get(name)
        if param is not None and hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                tensor = param.detach().cpu() if rank0 else None
        if not rank0:
            continue
        tensor = tensor.cpu()
        digest.update(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest() if rank0 else None


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of all that decides how the tokenizer maps text to ids: its vocabulary, merges,
    normalizer and pre-tokenizer (the backend's whole serialization), added tokens, special tokens,
    chat template and sides; not only its length and special tokens."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    meta = {"class": type(tok).__name__, "chat_template": tok.chat_template,
            "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
            "added": {str(i): str(t) for i, t in tok.added_tokens_decoder.items()},
            "padding_side": tok.padding_side, "truncation_side": tok.truncation_side,
            "bos": getattr(tok, "add_bos_token", None), "eos": getattr(tok, "add_eos_token", None)}
    return hashlib.sha256((json.dumps(meta, sort_keys=True) + body).encode()).hexdigest()


def reference_keys(recipe, train_set, test_set) -> dict[str, str]:
    """The `reference_keys` of CachedReference for a stage's datasets from training.reference_cache."""
    keys = {}
    for name, dataset in (("train", train_set), ("eval", test_set)):
        if dataset is not None and dataset.cache_files:
            source = Path(dataset.cache_files[0]["filename"])
            keys[name], keys["dir"] = source.stem, str(source.parent)
    return keys


def reference_pass(trainer, seconds: float) -> dict:
    """result.json fields: whether the stage's reference log-probs were computed or reused, how long
    building the trainer took (tokenizing, hashing the reference, and the pass when it ran), and of
    that the key's hashing (under ZeRO-3 the weights' gather and hash; else the tokenizer's, TRL having
    hashed the weights in its __init__)."""
    reuse = getattr(trainer, "reference_reuse", {})
    if not reuse:
        return {}
    info = {"reference_logps": "reused" if all(reuse.values()) else "computed",
            "reference_pass_s": round(seconds, 3), "reference_hash_s": getattr(trainer, "reference_hash_s", None)}
    if trainer.accelerator.is_main_process:
        emit("reference_logps", **info, splits=reuse)
    return info
