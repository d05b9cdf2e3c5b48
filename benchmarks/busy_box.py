"""The README's first command on a busy machine: CPU threads bounded vs torch's default, in one run.

    .venv/bin/python benchmarks/busy_box.py [--hogs 2] [--short] [--cases before-quiet,after-quiet,before-busy,after-busy]

Runs `alignctl tiny-model runs/tiny-model && alignctl run --local examples/tiny-run.yaml` (the
README's quickstart, setup excluded) in a fresh temporary directory, four times, back to back:

  before  OMP_NUM_THREADS = the machine's cores: what torch, OpenMP and MKL do when nothing bounds
          them (one intra-op thread per core in every process), i.e. this code before threads
          were bounded; the script checks that torch's default here is that number
  after   nothing set: alignctl bounds each process itself (the usable cores, less those other
          work keeps busy at each stage's start, divided by the stage's processes)

each once on the machine as it is ("quiet") and once beside --hogs CPU hogs (`yes > /dev/null`).
--short trains one epoch of SFT and of DPO instead of 6 and 2 (`--set`), for a box so busy that
the whole command four times would take an hour. It prints each wall time, the busy/quiet ratio before and after, and before/after under the hogs.
The machine is whatever else runs on it too: "quiet" means no hogs of ours, not an idle box, so
compare the ratios of one run, never figures of different runs.

Measured (--short, 2 cores shared with other agents' tests and builds, load average 12-23 throughout,
so "quiet" was busy too): before-quiet 1155 s, after-quiet 664 s, before-busy 984 s, after-busy
661 s: bounded threads 1.74x faster without our hogs and 1.49x beside them; the stages got 1 thread
(the box had no free core) where torch took 2. On this box the hogs added little to the load others
made (busy/quiet 0.85x before, 1.00x after): the ratio to read is before/after.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CASES = ("before-quiet", "after-quiet", "before-busy", "after-busy")


SHORT = " --set stages.sft.training.epochs=1 --set stages.dpo.training.epochs=1"


def readme_command(cwd: Path, env: dict[str, str], log: Path, short: bool) -> tuple[float, int, str]:
    """Wall seconds, exit code and the stages' thread lines of the quickstart in `cwd`."""
    t0 = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call(f"{BIN}/alignctl tiny-model runs/tiny-model && "
                               f"{BIN}/alignctl run --local examples/tiny-run.yaml{SHORT if short else ''}",
                               shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    threads = sorted(set(re.findall(r"cpu threads per process: (\d+)",
                                    "".join(p.read_text() for p in (cwd / "runs").rglob("log.txt")))))
    return wall, code, ",".join(threads)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hogs", type=int, default=2, help="busy processes beside the busy cases (default 2)")
    p.add_argument("--short", action="store_true", help="one epoch of SFT and of DPO (see above)")
    p.add_argument("--cases", default=",".join(CASES), help="which cases, in this order")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    print(f"{cores} cores; torch's default intra-op threads here: {default.stdout.strip()}; load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    base.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="busy-box-") as tmp:
        for case in args.cases.split(","):
            way, load = case.split("-")
            cwd = Path(tmp) / case
            cwd.mkdir()
            (cwd / "examples").symlink_to(ROOT / "examples")
            env = dict(base, **({"OMP_NUM_THREADS": str(cores)} if way == "before" else {}))
            hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.hogs if load == "busy" else 0)]
            try:
                wall, code, threads = readme_command(cwd, env, Path(tmp) / f"{case}.log", args.short)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            if code != 0:
                print((Path(tmp) / f"{case}.log").read_text()[-3000:])
                print(f"{case}: exit {code}")
                return 1
            walls[case] = wall
            print(f"{case:<13} {wall:7.1f} s  (threads per stage process: {threads}; load average now "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    if {"before-quiet", "before-busy"} <= walls.keys():
        print(f"before: busy/quiet = {walls['before-busy'] / walls['before-quiet']:.2f}x")
    if {"after-quiet", "after-busy"} <= walls.keys():
        print(f"after:  busy/quiet = {walls['after-busy'] / walls['after-quiet']:.2f}x")
    if {"before-busy", "after-busy"} <= walls.keys():
        print(f"beside {args.hogs} hogs: before/after = {walls['before-busy'] / walls['after-busy']:.2f}x")
    if {"before-quiet", "after-quiet"} <= walls.keys():
        print(f"quiet: before/after = {walls['before-quiet'] / walls['after-quiet']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
