"""Two ranks of one launch print events into one pipe: every line the parent reads is one event."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RANK = """
import os, sys, time
sys.path.insert(0, {path!r})
from alignment_trainer.results import emit
open({ready!r}, "w").close()
while not os.path.exists({go!r}):  # both ranks start printing together, as at a stage's last step
    time.sleep(0.0005)
for i in range(5000):
    emit("progress", step=i, total=5000, task="generate", rank={rank})
"""


def test_events_from_two_ranks_sharing_stdout_never_merge_into_one_line(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as launch_env and the trainer image set it
    go = tmp_path / "go"
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", RANK.format(path=str(REPO / "trainer_image"), rank=r,
                                                                  ready=str(tmp_path / f"ready-{r}"), go=str(go))],
                              stdout=write, env=env) for r in (0, 1)]
    os.close(write)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    events = [json.loads(line) for line in lines]  # a merged `{...}{...}` line raises here
    assert len(events) == 10000
    for r in (0, 1):
        assert [e["step"] for e in events if e["rank"] == r] == list(range(5000))
