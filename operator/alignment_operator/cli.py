"""`alignctl`: the command line for AlignmentRuns.

    alignctl validate FILE...          check manifests as the API server and operator would
    alignctl crd [-o FILE]             write the CRD generated from the API models
    alignctl tiny-model DIR            build a tiny random model for CPU runs (needs [trainer])
    alignctl run --local RUN.yaml      run every stage on this machine (needs [trainer]);
                                       [--set PATH=VALUE] [--from STAGE] [--redo STAGE]
    alignctl inspect RUN.yaml          each stage's data before training: samples with the trained
                                       tokens marked, lengths, what truncation cuts, invalid rows
    alignctl render RUN.yaml           print every object the operator would create
    alignctl import handbook SFT.yaml DPO.yaml   an AlignmentRun from alignment-handbook recipes
    alignctl operator                  run the operator (kopf) against the current kubeconfig
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import yaml

from .api import RunInvalid, parse_run, run_documents


def one_line(run) -> str:
    """A run in one line: model, stages, where it runs."""
    from .graph import describe

    stages = describe(run)
    r = run.spec.stages[0].resources
    where = f"{r.nodes} node(s) x {r.gpus_per_node} GPU" if r.gpus_per_node else f"{r.nodes} node(s), CPU"
    return f"{run.metadata.name}: {run.spec.model.source}; {stages}; {where}"


def cmd_validate(args: argparse.Namespace) -> int:
    from .local.paths import path_problems

    failed = 0
    for name in args.files:
        path = Path(name)
        try:
            for doc in run_documents(path):
                run = parse_run(doc, str(path))
                # The local paths it names that are meant to be here (their directory is): a typo
                # fails now, not a minute into a stage. `run --local` checks every local path.
                notes: list[str] = []
                problems = path_problems(run, strict=False, notes=notes)
                if problems:
                    raise RunInvalid(problems, str(path))
                print(f"ok  {path}: {one_line(run)}")
                for note in notes:
                    print(f"  note: {note}", file=sys.stderr)
        except RunInvalid as e:
            failed += 1
            print(f"ERR {e}", file=sys.stderr)
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from .crd import render_crd_yaml

    text = render_crd_yaml()
    for output in args.output:
        Path(output).write_text(text)
    if not args.output:
        sys.stdout.write(text)
    return 0


def _trainer_tool(module: str, argv: list[str]) -> int:
    """Run one of the trainer's own tools as a process (the operator never imports the trainer)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("alignment_trainer") is None or importlib.util.find_spec("torch") is None:
        print("alignctl: this needs the trainer extra: pip install 'alignment-operator[trainer]'", file=sys.stderr)
        return 2
    from alignment_trainer.launch import launch_env, visible_gpus

    from .local.runner import local_threads

    # DS_ACCELERATOR=cpu on a machine without GPUs: no DeepSpeed "unable to detect" warning.
    env = {**os.environ, **launch_env(cpu=visible_gpus() == 0, threads=local_threads(1, quiet=True))}
    return subprocess.call([sys.executable, "-m", module, *argv], env=env)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    vocab = ["--vocab-size", str(args.vocab_size)] if args.vocab_size else []
    return _trainer_tool("alignment_trainer.tiny", [args.directory, *args.corpus, *vocab])


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        print("alignctl run: only --local is supported; on a cluster, `kubectl apply -f` the run",
              file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("alignctl run --local needs the trainer extra: pip install 'alignment-operator[trainer]'",
              file=sys.stderr)
        return 2
    from .local import run_local

    return run_local(args.file, args.workdir, overrides=args.set, redo=args.redo, from_stage=args.from_stage)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Each stage's data as the stage will see it (the trainer's own tool, per rendered recipe)."""
    import tempfile

    from .local.runner import read_run
    from .render.recipe import build_recipe

    try:
        run = read_run(args.file, args.set)
    except RunInvalid as e:
        print(f"ERR {e}", file=sys.stderr)
        return 2
    names = [s.name for s in run.spec.stages]
    if args.stage and args.stage not in names:
        print(f"ERR --stage {args.stage}: no such stage; the stages: {', '.join(names)}", file=sys.stderr)
        return 2
    root, worst = os.path.abspath(args.workdir), 0
    with tempfile.TemporaryDirectory(prefix="alignctl-inspect-") as tmp:
        for i, stage in enumerate(run.spec.stages):
            if args.stage and stage.name != args.stage:
                continue
            print(f"=== stage {stage.name} ({stage.method})", flush=True)
            waits = [d.stage for d in stage.datasets + stage.test_datasets if d.stage]
            if waits:
                print(f"reads what stage(s) {', '.join(waits)} will write: inspect it once they ran\n")
                continue
            recipe = build_recipe(run, i, root)
            if not Path(recipe.model.model_name_or_path).exists() and recipe.model.model_name_or_path.startswith(root):
                # An earlier stage's model, not trained yet: its tokenizer is the base model's.
                recipe.model.model_name_or_path = run.spec.model.source
            path = Path(tmp) / f"{stage.name}.yaml"
            path.write_text(recipe.dump())
            worst = max(worst, _trainer_tool("alignment_trainer.inspect_data", [str(path), "--samples", str(args.samples)]))
            print()
    return worst


def cmd_import(args: argparse.Namespace) -> int:
    """alignment-handbook recipes -> an AlignmentRun, validated; what it cannot carry, named."""
    from .handbook import handbook_run

    recipes = []
    for name in args.files:
        try:
            recipe = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError) as e:
            print(f"ERR {name}: cannot read: {e}", file=sys.stderr)
            return 2
        if not isinstance(recipe, dict) or "model_name_or_path" not in recipe:
            print(f"ERR {name}: not an alignment-handbook recipe (no model_name_or_path)", file=sys.stderr)
            return 2
        recipes.append((name, recipe))
    doc, notes = handbook_run(recipes, args.name, gpus=args.gpus, distributed=args.distributed)
    try:
        run = parse_run(doc, "the imported run")
    except RunInvalid as e:
        print(f"ERR {e}", file=sys.stderr)
        return 2
    head = [f"# Imported by `alignctl import handbook {' '.join(args.files)}`: {one_line(run)}.",
            f"# Resources (not in a handbook recipe): {args.gpus} GPUs on one node, {args.distributed} (the handbook's "
            "launch: recipes/accelerate_configs/deepspeed_zero3.yaml, 8 processes).",
            "# Not carried, or carried differently:" if notes else "# Every value carried.", *(f"#   {n}" for n in notes)]
    text = "\n".join(head) + "\n" + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {one_line(run)}")
    else:
        sys.stdout.write(text)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .render.manifests import RenderContext, build_all

    ctx = RenderContext(pytorchjob_available=args.pytorchjob, jobset_available=args.jobset,
                        **({"trainer_image": args.trainer_image} if args.trainer_image else {}))
    try:
        runs = [parse_run(d, args.file) for d in run_documents(args.file)]
    except RunInvalid as e:
        print(f"ERR {e}", file=sys.stderr)
        return 1
    out = []
    for run in runs:
        if args.namespace:
            run.metadata.namespace = args.namespace
        out += build_all(run, ctx)
    sys.stdout.write(yaml.dump_all(out, Dumper=_BlockDumper, sort_keys=False))
    return 0


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the recipe in its ConfigMap) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import kopf

    from . import handlers, kube  # noqa: F401  (registers the handlers)

    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL)
    logging.getLogger().setLevel(args.log_level.upper())
    kube.load_config()
    namespaces = [n for n in (args.namespaces or "").split(",") if n]
    # kopf pauses every peer of the highest priority when several share it, so each replica
    # draws its own: exactly one acts, and another takes over within seconds if it dies.
    priority = int(os.environ.get("ALIGNMENT_PEERING_PRIORITY") or random.SystemRandom().randrange(1, 2**31))
    asyncio.run(kopf.operator(
        clusterwide=not namespaces, namespaces=namespaces, standalone=not args.peering,
        peering_name=args.peering or None, priority=priority if args.peering else None,
        liveness_endpoint=args.liveness))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """An eval of several stages as a table (status.comparison), from a local run's status.json (the run file
    and --workdir) or an AlignmentRun as JSON/YAML (`kubectl get alignmentrun NAME -o json | alignctl compare -`)."""
    import json

    from .local.view import compare_table, compared_rows, rel

    text = sys.stdin.read() if args.run == "-" else Path(args.run).read_text()
    doc = yaml.safe_load(text)
    if isinstance(doc, dict) and doc.get("kind") == "AlignmentRun" and "status" not in doc:  # a run file: run here
        from .render.recipe import stage_dir

        run = parse_run(doc, args.run)
        status_path = Path(stage_dir(os.path.abspath(args.workdir), run, "-")).parent / "status.json"
        if not status_path.is_file():
            print(f"alignctl compare: {rel(status_path)} does not exist: run it first (alignctl run --local "
                  f"{args.run})", file=sys.stderr)
            return 2
        doc = json.loads(status_path.read_text())
    status = doc.get("status", doc) if isinstance(doc, dict) else {}
    table = compare_table(status, args.sort)
    if not table:
        print("no comparison: the run has no eval of several stages (a matrix's variants or eval.stages), "
              "or it has not run yet", file=sys.stderr)
        return 1
    print(table)
    if args.plot:  # the rows as the table shows them, for the trainer's plotting tool
        source = Path(args.plot).with_suffix(".json")
        source.write_text(json.dumps({"comparison": compared_rows(status, args.sort)}))
        metrics = [args.sort] if args.sort else []
        return _trainer_tool("alignment_trainer.plots", ["--compare", str(source), args.plot, *metrics,
                                                         "preference_accuracy", "reward_margin", "eval_loss"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignctl", description="Align language models on Kubernetes.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="validate AlignmentRun manifests")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("crd", help="print the CustomResourceDefinition")
    c.add_argument("-o", "--output", action="append", default=[],
                   help="write to this file instead of stdout (repeatable: the chart keeps a copy)")
    c.set_defaults(func=cmd_crd)

    t = sub.add_parser("tiny-model", help="build a tiny random model and tokenizer for CPU runs")
    t.add_argument("directory")
    t.add_argument("corpus", nargs="*", help="text/JSONL files to train the tokenizer on (default: examples/data)")
    t.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary (default 2048)")
    t.set_defaults(func=cmd_tiny_model)

    rd = sub.add_parser("render", help="print every object the operator would create for a run")
    rd.add_argument("file")
    rd.add_argument("-n", "--namespace", help="namespace to render into (default: the manifest's, else default)")
    rd.add_argument("--trainer-image", help="trainer image when the run names none")
    rd.add_argument("--pytorchjob", action="store_true", help="render multi-node stages as PyTorchJobs")
    rd.add_argument("--jobset", action="store_true", help="render multi-node stages as JobSets (before PyTorchJobs)")
    rd.set_defaults(func=cmd_render)

    op = sub.add_parser("operator", help="run the operator")
    op.add_argument("--namespaces", default=os.environ.get("ALIGNMENT_NAMESPACES", ""),
                    help="comma-separated namespaces to watch (default: cluster-wide)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness/readiness endpoint")
    op.add_argument("--peering", default=os.environ.get("ALIGNMENT_PEERING", ""),
                    help="kopf peering name: replicas sharing one never act together")
    op.add_argument("--log-level", default=os.environ.get("ALIGNMENT_LOG_LEVEL", "info"))
    op.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("ALIGNMENT_LOG_FORMAT", "text"))
    op.set_defaults(func=cmd_operator)

    ins = sub.add_parser("inspect", help="each stage's data as it will train on it: samples, lengths, cuts, invalid rows")
    ins.add_argument("file")
    ins.add_argument("--stage", help="only this stage")
    ins.add_argument("--samples", type=int, default=2, help="rows rendered per split, trained tokens marked (default 2)")
    ins.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="as for run --local")
    ins.add_argument("--workdir", default="runs", help="the run's outputs, as for run --local (default: runs/)")
    ins.set_defaults(func=cmd_inspect)

    im = sub.add_parser("import", help="write an AlignmentRun from other tools' recipes")
    im.add_argument("kind", choices=["handbook"], help="handbook: alignment-handbook recipes (config_*.yaml)")
    im.add_argument("files", nargs="+", help="the recipes in stage order, e.g. sft/config_full.yaml dpo/config_full.yaml")
    im.add_argument("-o", "--output", help="write the run here (default: stdout)")
    im.add_argument("--name", default="imported", help="metadata.name of the run (default: imported)")
    im.add_argument("--gpus", type=int, default=8, help="GPUs per stage (default 8, the handbook's launch)")
    im.add_argument("--distributed", default="deepspeed-zero3", help="strategy per stage (default deepspeed-zero3)")
    im.set_defaults(func=cmd_import)

    cmp = sub.add_parser("compare", help="a sweep's comparison table: each evaluated stage, its values and metrics")
    cmp.add_argument("run", help="the run file (its local status.json under --workdir), or an AlignmentRun as JSON/YAML "
                                 "('-': stdin, e.g. kubectl get alignmentrun NAME -o json)")
    cmp.add_argument("--workdir", default="runs", help="where run --local wrote it (default: runs/)")
    cmp.add_argument("--sort", metavar="METRIC", help="sort by this metric, best first (default: the eval's compareBy)")
    cmp.add_argument("--plot", metavar="OUT.png", help="also draw the metrics side by side (matplotlib)")
    cmp.set_defaults(func=cmd_compare)

    r = sub.add_parser("run", help="run an AlignmentRun's stages on this machine")
    r.add_argument("--local", action="store_true", help="run here, stage after stage, as child processes")
    r.add_argument("--workdir", default="runs", help="where stage outputs and status.json go (default: runs/)")
    r.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a value of the run file, validated like the file (repeatable): "
                        "stages.dpo.training.beta=0.05, model.dtype=float32, 'stages.sft.datasets[0].weight=0.5'")
    r.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="run STAGE again from scratch, and every stage that read it (repeatable); its "
                        "directory (checkpoints, final/) is removed first")
    r.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="run STAGE and every stage after it again from scratch; earlier ones are kept")
    r.add_argument("file")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
