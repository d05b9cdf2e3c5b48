"""A stage process's imports with the venv's bytecode vs compiled from source, in one run.

    .venv/bin/python benchmarks/stage_imports.py [--repeat 3] [--module alignment_trainer.stages.dpo]

Every stage the pipeline runs (locally, and in the tests that run it) is a new Python process that
imports torch, transformers, TRL and the stage's own modules before its first step. scripts/setup
writes their bytecode once (it imports every stage with writing on): uv installs none, and on a
host that sets PYTHONDONTWRITEBYTECODE nothing writes it at import either, so each process
compiled ~3000 modules from source. This measures the CPU time (user + sys, of the child) of `import MODULE` in
a fresh process, --repeat times each way, alternating:

  source    PYTHONPYCACHEPREFIX=<an empty directory> and PYTHONDONTWRITEBYTECODE=1: Python looks
            for bytecode only there, finds none and writes none, so every module compiles from
            source, as in a venv without bytecode
  bytecode  the venv as scripts/setup leaves it

and prints the medians and source/bytecode. It refuses to start when torch has no bytecode in the
venv (run scripts/setup first), and voids the comparison if a `source` run wrote any.

Measured (2-core AMD EPYC, nothing else running, --repeat 2, alignment_trainer.stages.dpo):
source 18.2 s, bytecode 7.9 s of CPU per process: 2.32x.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile


def cpu_of(argv: list[str], env: dict[str, str]) -> float:
    """CPU seconds (user + sys) one child process took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--module", default="alignment_trainer.stages.dpo")
    args = parser.parse_args()

    spec = importlib.util.find_spec("torch")
    cached = importlib.util.cache_from_source(spec.origin)
    if not os.path.exists(cached):
        sys.exit(f"no bytecode for torch ({cached}): run scripts/setup first")

    argv = [sys.executable, "-W", "ignore", "-c", f"import {args.module}"]
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX",)}
    times: dict[str, list[float]] = {"source": [], "bytecode": []}
    with tempfile.TemporaryDirectory() as empty:
        source_env = base | {"PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
        for i in range(args.repeat):
            times["source"].append(cpu_of(argv, source_env))
            times["bytecode"].append(cpu_of(argv, base))
            print(f"  round {i + 1}: source {times['source'][-1]:.1f} s, bytecode {times['bytecode'][-1]:.1f} s",
                  flush=True)
        if os.listdir(empty):
            sys.exit("the source runs wrote bytecode: the comparison is void")
    source, bytecode = statistics.median(times["source"]), statistics.median(times["bytecode"])
    print(f"import {args.module}: source {source:.1f} s, bytecode {bytecode:.1f} s of CPU per process "
          f"(median of {args.repeat}): {source / bytecode:.2f}x")


if __name__ == "__main__":
    main()
