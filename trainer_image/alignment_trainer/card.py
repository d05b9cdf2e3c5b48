"""The model card of a stage's final/ (README.md): what a reader of the Hub page needs, no machine paths.

Built with huggingface_hub's ModelCard / ModelCardData / EvalResult, so the Hub reads its metadata:

    base_model, datasets, tags, library_name
    alignment_operator: {run, base_model, base_model_revision, stages: [{stage, method, loss_type,
                         adapter, learning_rate, epochs, ...}, ...]}
    model-index       (the eval stage's card): one EvalResult per metric it measured

A training stage's card starts from the card of the model it trained from (an earlier stage's
final/README.md), so the last stage's card lists every stage of the run. A local path (a model
directory, a data file) is named by its last component, never by where it lies on a machine.
The eval stage writes the card of the model it evaluated, with its results, to its own directory
(the evaluated stage's final/ is left as written); a push from the eval stage uploads that card, and
an export of the promoted model (export.py) uploads it as README.md with the URIs it was exported to
(export_card), every other file as final/ holds it.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .recipe import DatasetArgs, Recipe

log = logging.getLogger("alignment_trainer")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
KEY = "alignment_operator"
# result.json keys that describe the measurement rather than the model (counts, settings, timings)
NOT_RESULTS = {"pairs", "scored_pairs", "unscored_pairs", "eval_tokens", "reward_beta", "reference_pass_s",
               "reward_prompts", "global_step"}


def public_name(path: str) -> str:
    """A Hub id as it is; a local path (absolute, relative, or existing here) by its last component
    (a stage's final/ by its stage directory's name)."""
    p = Path(path)
    if not (p.is_absolute() or path.startswith(".") or p.exists()) and HUB_ID.match(path):
        return path
    parts = [part for part in p.parts if part not in ("/", ".", "..")]
    if parts and parts[-1] == "final" and len(parts) > 1:
        return f"{parts[-2]} (an earlier stage)"
    return parts[-1] if parts else path


def is_hub_id(path: str) -> bool:
    return public_name(path) == path


def _dataset(d: DatasetArgs) -> str:
    name = public_name(d.path)
    extra = [f"config {d.name}"] if d.name else []
    extra += [f"split {d.split}"] + ([f"weight {d.weight}"] if d.weight != 1.0 else [])
    return f"{name} ({', '.join(extra)})"


def stage_entry(recipe: Recipe, global_step: int) -> dict:
    """One stage's recipe as the card lists it: method and the hyperparameters that define it."""
    t = recipe.training
    entry = {"stage": recipe.stage_name or recipe.method, "method": recipe.method}
    if recipe.effective_loss_type:
        entry["loss_type"] = recipe.effective_loss_type
    entry["adapter"] = "full fine-tuning" if recipe.lora is None else (
        f"LoRA r={recipe.lora.r} alpha={recipe.lora.lora_alpha}"
        + (f" {recipe.lora.quantization}" if recipe.lora.quantization else "")
        + (" (merged)" if recipe.lora.merge else ""))
    entry.update({
        "datasets": [_dataset(d) for d in recipe.datasets],
        "learning_rate": t.learning_rate, "lr_scheduler": t.lr_scheduler_type, "epochs": t.num_train_epochs,
        "max_steps": t.max_steps, "optimizer_steps": global_step,
        "per_device_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_length": t.max_length, "seed": t.seed,
    })
    if recipe.info.preference or recipe.method in ("grpo", "kto"):
        entry["beta"] = t.beta
    return {k: v for k, v in entry.items() if v is not None}


def earlier(model_path: str) -> dict:
    """The alignment_operator metadata of the card in model_path (an earlier stage's final/), or {}."""
    readme = Path(model_path) / "README.md"
    if not readme.is_file():
        return {}
    try:  # a model directory from elsewhere may carry any card: only ours is read
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as e:  # noqa: BLE001 - a card that does not parse names no earlier stages
        log.warning("%s: not read (%s); the card lists this run's stages from here", readme.name, e)
        return {}
    meta = data.get(KEY)
    return meta if isinstance(meta, dict) and isinstance(meta.get("stages"), list) else {}


def _hub_datasets(stages: list[dict], recipes: list[Recipe]) -> list[str]:
    ids = [public_name(d.path) for r in recipes for d in r.datasets if is_hub_id(d.path)]
    for stage in stages:
        ids += stage.get("hub_datasets", [])
    return sorted(set(ids))


def stage_card(recipe: Recipe, global_step: int, tracked: dict[str, str] | None = None) -> ModelCard:
    """The card of a training stage's final/: the run's base model, every stage up to this one."""
    before = earlier(recipe.model.model_name_or_path)
    source = recipe.base_model or recipe.model.model_name_or_path
    base = before.get("base_model") or public_name(source)
    on_hub = before.get("base_model_on_hub", is_hub_id(source))
    revision = before.get("base_model_revision") or recipe.base_model_revision or recipe.model.model_revision
    entry = stage_entry(recipe, global_step)
    entry["hub_datasets"] = [public_name(d.path) for d in recipe.datasets if is_hub_id(d.path)]
    links = {k: v for k, v in (tracked or {}).items() if v.startswith(("http://", "https://"))}
    if links:
        entry["tracking"] = links
    stages = _accelerator([*before.get("stages", []), entry], recipe)
    meta = {"run": recipe.run_name, "base_model": base, "base_model_on_hub": on_hub, "base_model_revision": revision,
            "stages": stages}
    return _card(recipe.hub_model_id or recipe.run_name or recipe.stage_name or recipe.method, meta, [])


def eval_card(recipe: Recipe, result: dict) -> ModelCard:
    """The card of the model an eval stage measured (recipe.model), with result's metrics as model-index."""
    before = earlier(recipe.model.model_name_or_path)
    source = recipe.base_model or recipe.model.model_name_or_path
    meta = {"run": recipe.run_name or before.get("run"),
            "base_model": before.get("base_model") or public_name(source),
            "base_model_on_hub": before.get("base_model_on_hub", is_hub_id(source)),
            "base_model_revision": before.get("base_model_revision") or recipe.base_model_revision,
            "stages": _accelerator(before.get("stages", []), recipe)}
    held_out = ", ".join(public_name(d.path) for d in recipe.datasets) or "held-out data"
    hub = len(recipe.datasets) == 1 and is_hub_id(recipe.datasets[0].path)
    results = [EvalResult(task_type="text-generation", task_name=f"alignment-operator {recipe.stage_name or 'eval'}",
                          dataset_type=held_out if hub else "json", dataset_name=held_out,
                          metric_type=key, metric_name=key, metric_value=value)
               for key, value in eval_metrics(result).items()]
    return _card(recipe.hub_model_id or meta["run"] or "model", meta, results)


def _accelerator(stages: list[dict], recipe: Recipe) -> list[dict]:
    """Each listed stage with its GPU-hours as the operator counted them (every attempt), where known."""
    seconds = recipe.gpu_seconds or {}
    return [{**s, "gpu_hours": round(seconds[s["stage"]] / 3600, 4)} if s.get("stage") in seconds else s
            for s in stages]


def eval_metrics(result: dict) -> dict[str, float]:
    """The finite numbers of an eval result.json that measure the model (not the reference model, not counts)."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and not k.startswith("reference_") and k not in NOT_RESULTS}


def _card(title: str, meta: dict, results: list[EvalResult]) -> ModelCard:
    stages = meta["stages"]
    data = ModelCardData(
        base_model=meta["base_model"] if meta["base_model_on_hub"] else None,
        datasets=_hub_datasets(stages, []) or None,
        library_name="transformers", tags=["alignment-operator", "trl", *dict.fromkeys(s["method"] for s in stages)],
        model_name=title, eval_results=results or None, **{KEY: meta})
    revision = f" at revision `{meta['base_model_revision']}`" if meta.get("base_model_revision") else ""
    lines = [f"# {title}", "",
             f"Fine-tuned from `{meta['base_model']}`{revision} by alignment-operator"
             + (f" (run `{meta['run']}`)" if meta.get("run") else "")
             + f", in {len(stages)} stage{'s' * (len(stages) != 1)}.", ""]
    for i, s in enumerate(stages, 1):
        lines.append(f"## Stage {i}: {s['stage']} ({s['method']}{', loss ' + s['loss_type'] if 'loss_type' in s else ''})")
        lines.append("")
        lines.append(f"- {s['adapter']}; learning rate {s.get('learning_rate')}, {s.get('lr_scheduler')} schedule, "
                     f"{s.get('epochs')} epochs, {s.get('optimizer_steps')} optimizer steps")
        lines.append(f"- batch {s.get('per_device_batch_size')} per device x {s.get('gradient_accumulation_steps')} "
                     f"accumulation, max length {s.get('max_length')}"
                     + (f", beta {s['beta']}" if "beta" in s else "") + f", seed {s.get('seed')}")
        lines += [f"- data: {d}" for d in s.get("datasets", [])]
        if "gpu_hours" in s:
            lines.append(f"- accelerator time: {s['gpu_hours']:.4g} GPU-hours, every attempt"
                         if s["gpu_hours"] else "- accelerator time: CPU only")
        lines += [f"- {name}: {url}" for name, url in s.get("tracking", {}).items()]
        lines.append("")
    if any("gpu_hours" in s for s in stages):
        lines += [f"GPU-hours of the stages listed: {sum(s.get('gpu_hours', 0.0) for s in stages):.4g}", ""]
    if results:
        lines += ["## Evaluation", "", f"On {results[0].dataset_name}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {r.metric_type} | {r.metric_value:.4g} |" for r in results]
        lines.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ---------------------------------------------------------------------------- exports

def public_uri(uri: str) -> str:
    """An s3:// URI or an endpoint URL without what must never be published: user:password@, a query
    (presigned signatures), a fragment."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else uri


def export_card(text: str, uris: list[str], endpoint_url: str | None = None) -> str | None:
    """`text` (a card of ours: the eval stage's card of the promoted model, or its final/README.md) with
    where the model was exported: alignment_operator.exports in its metadata and an Exports section,
    each URI and the store's endpoint without credentials. None when `text` is not a card of ours."""
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except Exception as e:  # noqa: BLE001 - a card that does not parse is exported as it is
        log.warning("README.md: not read (%s); exported as it is", e)
        return None
    meta = getattr(card.data, KEY, None)
    if not isinstance(meta, dict) or not isinstance(meta.get("stages"), list):
        return None
    where = [public_uri(u).rstrip("/") for u in uris]
    endpoint = public_uri(endpoint_url) if endpoint_url else None
    setattr(card.data, KEY, {**meta, "exports": where, **({"export_endpoint": endpoint} if endpoint else {})})
    store = f"the S3-compatible store at {endpoint}" if endpoint else "S3"
    section = ["## Exports", "", "This model, promoted by its run's own evaluation, was exported to:", ""]
    section += [f"- `{u}`: " + (f"{store}; complete once `{u}/_EXPORT_COMPLETE.json` (each file's size and "
                                "SHA-256, checked after writing) is there" if u.startswith("s3://") else
                                "the Hugging Face Hub, in one commit") for u in where]
    card.text = card.text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    return str(card)


# ---------------------------------------------------------------------------- the push

def push(recipe: Recipe, folder: Path, card: ModelCard | None = None) -> str:
    """Upload folder (a final/) to recipe.hub_model_id in one commit, README.md replaced by card when
    given (the eval stage's card of the model it measured). The token is huggingface_hub's: HF_TOKEN (a pod
    gets it from spec.trainer.hfTokenSecretRef), else the one `hf auth login` stored; never printed."""
    if not recipe.hub_model_id:
        raise ValueError("hub_model_id: required with push_to_hub")
    return push_folder(recipe.hub_model_id, recipe.hub_private, folder, str(card).encode() if card else None,
                       f"alignment-operator: {recipe.run_name or ''} stage {recipe.stage_name or recipe.method}")


def push_folder(repo_id: str, private: bool, folder: Path, readme: bytes | None, message: str) -> str:
    """folder to the Hub repository repo_id (created if missing) in one commit, README.md from `readme`
    when given; the repository's URL. Raises HubPushRefused (the token, its rights, the repository:
    retrying will not help) or HubPushFailed (the Hub or the network: a retry pushes again)."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = get_token()
    if not token:
        raise HubPushRefused("push_to_hub: no Hugging Face token: HF_TOKEN is not set and no `hf auth login` token "
                             "is stored (on a cluster: spec.trainer.hfTokenSecretRef); nothing was pushed")
    api = HfApi(token=token)
    replaced = folder / "README.md" if readme is not None else None
    operations = [CommitOperationAdd(path_in_repo=str(f.relative_to(folder)), path_or_fileobj=str(f))
                  for f in sorted(folder.rglob("*")) if f.is_file() and f != replaced]
    if readme is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.create_commit(repo_id=repo_id, operations=operations, commit_message=message)
    except Exception as e:  # noqa: BLE001 - whatever the Hub or the network said, the push fails saying it
        raise _push_failed(repo_id, folder, e) from e
    return str(url)


class HubPushRefused(ValueError):
    """The Hub refused the push (401, 403, 404: the token, its rights, the repository): retrying will not help."""


class HubPushFailed(RuntimeError):
    """The push did not get through (the Hub or the network failed): a retry pushes again."""


def _push_failed(repo_id: str, folder: Path, e: Exception) -> Exception:
    """The error: the push (not the training) failed, why, and that what it trained is kept."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    server = " ".join((getattr(e, "server_message", None) or "").split())[:300]  # the Hub's own words
    said = (f"HTTP {status}" + (f": {server}" if server else "") if status else
            f"{type(e).__name__}: " + " ".join((str(e) or "no message").split())[:300])
    words = f"push to the Hub repository {repo_id} failed ({said}); the trained model is kept in {folder}"
    if status in (401, 403, 404):
        return HubPushRefused(f"{words}; check that the token (HF_TOKEN: spec.trainer.hfTokenSecretRef's Secret, "
                              "or your Hugging Face login locally) may write to the repository, then retry")
    return HubPushFailed(f"{words}; a retry pushes it again")
