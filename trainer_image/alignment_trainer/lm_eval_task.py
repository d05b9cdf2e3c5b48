"""lm-evaluation-harness tasks on the eval stage's model (recipe.eval.lm_eval).

The model already loaded by the stage (an adapter merged, the recipe's dtype) is wrapped in
lm-eval's HFLM and handed to lm_eval.simple_evaluate, so every task, prompt format, filter and
metric is lm-eval's own. Tasks are names from lm-eval's registry or task YAML files on the
volume; `data_files` points a registry task (e.g. ifeval) at a local JSON copy of its dataset by
writing a one-line override task (include: the registry's YAML) under <output_dir>/lm_eval/tasks/.

Results: flat `<task>/<metric>` numbers (the filter appended when it is not lm-eval's "none"),
e.g. ifeval/prompt_level_strict_acc, ifeval/inst_level_loose_acc, plus lm-eval's whole results
JSON and the per-sample inputs/outputs in <output_dir>/lm_eval/.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path

import yaml

from .recipe import LmEvalArgs
from .results import emit

log = logging.getLogger("alignment_trainer")


def ensure_ifeval_resources() -> None:
    """IFEval's sentence counter needs NLTK's punkt_tab; lm-eval downloads it when missing, which
    cannot work offline: say where it is looked for and how the image provides it."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english")
        return
    except LookupError:
        pass
    try:
        nltk.download("punkt_tab", quiet=True, raise_on_error=True)
        nltk.data.find("tokenizers/punkt_tab/english")
    except Exception as e:  # noqa: BLE001 - offline, a proxy, a read-only home: one message
        raise ValueError(
            "eval.lm_eval: IFEval's checkers need NLTK's punkt_tab (English) and it is neither installed nor "
            f"downloadable here ({type(e).__name__}); looked in {nltk.data.path}. The trainer image carries it "
            "(tools/nltk_data.py); elsewhere run `python tools/nltk_data.py` or set NLTK_DATA") from None


def task_names(args: LmEvalArgs, task_dir: Path) -> tuple[list[str], list[str]]:
    """(names for simple_evaluate, extra include paths): registry names as they are, YAML files by
    their `task:` name; registry tasks with a local data file get an override task in task_dir."""
    names, include = [], []
    for entry in args.tasks:
        path = Path(entry)
        if entry.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise ValueError(f"eval.lm_eval.tasks: {entry} is not a file (a task YAML on the volume, or a "
                                 "task name of lm-eval's registry)")
            config = yaml.load(path.read_text(), Loader=_IgnoreTags) or {}
            if "task" not in config:
                raise ValueError(f"eval.lm_eval.tasks: {entry} has no `task:` name (not an lm-eval task YAML)")
            names.append(str(config["task"]))
            include.append(str(path.resolve().parent))
        else:
            names.append(entry)
    unknown = sorted(set(args.data_files) - set(names))
    if unknown:
        raise ValueError(f"eval.lm_eval.data_files: {unknown} are not among eval.lm_eval.tasks {names}")
    if args.data_files:
        task_dir.mkdir(parents=True, exist_ok=True)
        include.append(str(task_dir))
    return names, include


def write_local_overrides(args: LmEvalArgs, names: list[str], task_dir: Path, manager) -> list[str]:
    """A task `<name>_local` per data_files entry: the registry task's YAML with its dataset replaced."""
    out = list(names)
    for name, data in args.data_files.items():
        if not Path(data).is_file():
            raise ValueError(f"eval.lm_eval.data_files.{name}: {data} is not a file (JSON or JSONL)")
        registered = manager.task_index.get(name)  # an Entry (0.4.10+) or a dict (earlier 0.4)
        yaml_path = registered.get("yaml_path") if isinstance(registered, dict) else getattr(registered, "yaml_path", None)
        if not str(yaml_path or "").endswith((".yaml", ".yml")):
            raise ValueError(f"eval.lm_eval.data_files.{name}: {name!r} is not a task of lm-eval's registry with "
                             "a YAML config (groups and Python tasks cannot be pointed at a file)")
        override = {"include": str(yaml_path), "task": f"{name}_local", "dataset_path": "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(Path(data).resolve())}},
                    "test_split": "train", "validation_split": None, "training_split": None, "fewshot_split": None}
        (task_dir / f"{name}_local.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
        out[out.index(name)] = f"{name}_local"
    return out


class _IgnoreTags(yaml.SafeLoader):
    """Reads a task YAML's `task:` without resolving its !function tags."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def run_lm_eval(args: LmEvalArgs, model, tokenizer, out: Path, who: str = "model") -> dict[str, float]:
    """Run the tasks on one loaded model; numbers keyed <task>/<metric>, files under out/lm_eval/."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = out / "lm_eval"
    task_dir = folder / "tasks"
    names, include = task_names(args, task_dir)
    manager = TaskManager(include_path=include or None)
    if args.data_files:
        names = write_local_overrides(args, names, task_dir, manager)
        manager = TaskManager(include_path=include)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise ValueError(f"eval.lm_eval.tasks: {missing} are neither lm-eval tasks nor groups (nor task YAMLs "
                         "given by path); e.g. ifeval, gsm8k, mmlu, hellaswag, arc_challenge")
    if any(n.startswith("ifeval") for n in names):
        ensure_ifeval_resources()
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    tokenizer.padding_side = "left"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    emit("progress", step=0, total=len(names), task=f"lm_eval ({who})")
    output = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, num_fewshot=args.num_fewshot, limit=limit,
        apply_chat_template=args.apply_chat_template, log_samples=True,
        gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None)
    emit("progress", step=len(names), total=len(names), task=f"lm_eval ({who})")
    renamed = {f"{n}_local": n for n in args.data_files}
    metrics = flatten(output["results"], renamed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = output.pop("samples", {}) or {}
    for task, rows in samples.items():
        with (folder / f"{who}_samples_{task}.jsonl").open("w") as f:
            f.writelines(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows)
    output["package_versions"] = {"lm_eval": version("lm_eval"), "transformers": version("transformers")}
    (folder / f"{who}_results.json").write_text(json.dumps(output, indent=1, default=str))
    return metrics


def flatten(results: dict, renamed: dict[str, str]) -> dict[str, float]:
    """lm-eval's {task: {"metric,filter": value, "alias": ...}} as {"task/metric[/filter]": value}."""
    flat = {}
    for task, values in results.items():
        name = renamed.get(task, task)
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            flat[f"{name}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return flat
