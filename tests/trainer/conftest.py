"""Fixtures for the trainer tests: a tiny random chat model and toy datasets, built once per session.

Every dataset is learnable by a ~1M-parameter model in tens of steps:
- SFT: "Tell me about <subject>." -> one of three fixed answer shapes about that subject.
- preferences: chosen = a helpful answer about the subject, rejected = a curt refusal; the
  held-out test split uses subjects never seen in training.
- KTO: the same answers, unpaired, labelled desirable (helpful) or not (refusal).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

# The trainer extra (torch, TRL) is optional for the rest of the suite.
collect_ignore_glob = [] if importlib.util.find_spec("trl") else ["test_*.py"]

# Two cores, often shared: one intra-op thread per process is many times faster than two
# threads spinning against each other (measured: 0.1 s vs 0.4-4 s per tiny-model step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[2]
TRAIN_SUBJECTS = ["cats", "dogs", "rivers", "mountains", "bread", "music", "trains", "stars", "apples", "books",
                  "rain", "gardens", "clocks", "ships", "birds", "lamps"]
TEST_SUBJECTS = ["coffee", "chess", "snow", "bridges", "kites", "maps"]
GOOD = ["{s} are wonderful, and I am happy to tell you about {s}.",
        "Sure! Here is a short note about {s}: they are interesting.",
        "Great question. {s} have a long and curious history."]
BAD = ["No.", "I will not answer that.", "Go away.", "Ask someone else."]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def sft_rows(subjects, n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.choice(subjects)
        rows.append({"messages": _user(f"Tell me about {s}.") + _assistant(rng.choice(GOOD).format(s=s))})
    return rows


def pref_rows(subjects, n, seed):
    rng = random.Random(seed)
    return [{"prompt": _user(f"Tell me about {s}."), "chosen": _assistant(rng.choice(GOOD).format(s=s)),
             "rejected": _assistant(rng.choice(BAD))} for s in (rng.choice(subjects) for _ in range(n))]


def kto_rows(subjects, n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = rng.choice(subjects)
        good = i % 2 == 0  # alternate so every batch holds both labels
        text = rng.choice(GOOD).format(s=s) if good else rng.choice(BAD)
        rows.append({"prompt": _user(f"Tell me about {s}."), "completion": _assistant(text), "label": good})
    return rows


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "sft.jsonl", sft_rows(TRAIN_SUBJECTS, 256, 0))
    write_jsonl(d / "sft_test.jsonl", sft_rows(TEST_SUBJECTS, 16, 1))
    write_jsonl(d / "prefs.jsonl", pref_rows(TRAIN_SUBJECTS, 256, 2))
    write_jsonl(d / "prefs_test.jsonl", pref_rows(TEST_SUBJECTS, 32, 3))
    write_jsonl(d / "kto.jsonl", kto_rows(TRAIN_SUBJECTS, 256, 4))
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_dir) -> str:
    """A ~1M-parameter random Llama whose tokenizer was trained on the test data."""
    from alignment_trainer.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", sorted(data_dir.glob("*.jsonl")),
                               vocab_size=512))


def write_recipe(directory: Path, method: str, model: str, datasets: list[str], test: list[str] | None = None,
                 **sections) -> str:
    """A recipe YAML in `directory` (output_dir = directory/out); `training` etc. as keyword dicts."""
    recipe = {"method": method, "model": {"model_name_or_path": model, "torch_dtype": "float32"},
              "datasets": [{"path": p} for p in datasets], "output_dir": str(directory / "out"),
              "run_name": "test", "stage_name": method, "base_model": model, **sections}
    if test:
        recipe["test_datasets"] = [{"path": p} for p in test]
    path = directory / "recipe.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run_in_process(recipe_path: str) -> dict | None:
    """Run a stage in this process (single-process stages; saves ~10 s of imports per run)."""
    import torch

    from alignment_trainer.__main__ import run_recipe
    from alignment_trainer.recipe import load_recipe

    torch.set_num_threads(1)
    return run_recipe(load_recipe(recipe_path))


def trainer_env(extra: dict | None = None) -> dict:
    """Environment for a trainer subprocess: this interpreter's, the repo importable."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "trainer_image"), env.get("PYTHONPATH")]))
    bindir = str(Path(sys.executable).parent)  # `accelerate` from the same environment
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def events(stdout: str) -> list[dict]:
    """The JSON event lines a trainer printed."""
    out = []
    for line in stdout.splitlines():
        if line.startswith('{"event"'):
            out.append(json.loads(line))
    return out


def metrics(output_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir: str | Path) -> list[float]:
    return [m["loss"] for m in metrics(output_dir) if "loss" in m]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_model, data_dir) -> dict:
    """One SFT stage on the tiny model, shared by the SFT, EOS and DPO tests."""
    d = tmp_path_factory.mktemp("sft")
    path = write_recipe(d, "sft", tiny_model, [str(data_dir / "sft.jsonl")], [str(data_dir / "sft_test.jsonl")],
                        training={"max_steps": 60, "learning_rate": 3e-3, "warmup_ratio": 0.05,
                                  "per_device_train_batch_size": 16, "max_length": 64, "logging_steps": 5,
                                  "save_steps": 30},
                        termination_message_path=str(d / "termination-log"))
    result = run_in_process(path)
    return {"recipe": path, "output_dir": str(d / "out"), "result": result}


# ---------------------------------------------------------------------------- the sums task (online methods)
# "What is a + b?" (a, b in 1..5), the files examples/data/sums/make_data.py writes: the tiny model is
# SFT'd on replies that give the sum half the time ("The answer is <a+b>.") and are evasive otherwise
# ("I am not sure."); sampled, it is right well under half the time (its sums are shaky too). A regex
# rule reward checks the number against the prompt's `answer`. 18 of the 25 prompts train (x4 in
# prompts.jsonl), the other 7 are held out (x2 in held_out.jsonl).

SUMS_DATA = REPO / "examples" / "data" / "sums"
SUM_REWARD = {"kind": "regex", "column": "answer", "pattern": r"answer is (\d+)"}


@pytest.fixture(scope="session")
def sums(tmp_path_factory) -> dict:
    """The sums task's files and its SFT'd tiny model (vocab 256), shared by the grpo and online tests."""
    import runpy

    from alignment_trainer.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("sums")
    task = runpy.run_path(str(SUMS_DATA / "make_data.py"), run_name="make_data")
    task["main"](d)
    sft = d / "sft.jsonl"
    model = make_tiny_model(d / "model", [sft], vocab_size=256)
    path = write_recipe(d / "sft", "sft", str(model), [str(sft)],
                        training={"max_steps": 150, "learning_rate": 3e-3, "warmup_ratio": 0.05,
                                  "per_device_train_batch_size": 16, "max_length": 48, "logging_steps": 20,
                                  "save_steps": 1000, "gradient_checkpointing": False},
                        tracking={"report_to": []})
    run_in_process(path)
    return {"dir": d, "sft_final": str(d / "sft" / "out" / "final"), "regex": dict(SUM_REWARD),
            "pairs": task["PAIRS"], "committed": SUMS_DATA}


def run_subprocess(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=trainer_env(env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def kit():
    """The helpers above, as a fixture (test modules cannot import this conftest by name safely)."""
    return SimpleNamespace(write_recipe=write_recipe, run_in_process=run_in_process, trainer_env=trainer_env,
                           run_subprocess=run_subprocess, events=events, metrics=metrics, losses=losses,
                           repo=REPO, test_subjects=TEST_SUBJECTS)


class FakeJudge:
    """An OpenAI-compatible chat completions endpoint on localhost: the judge of the eval stage, the
    judged benchmarks and judge rewards. `grade(body)` gives the answer's content, or (content,
    logprobs). A request without `Bearer api_key` (when one is given), or off `path` (when given), is
    refused with 401; every other body is kept in .requests. mode "garbage": 200 with a body that is
    not JSON; mode "slow": answers after 2 s. `reported`: the model it says answered (default: the one
    asked for)."""

    def __init__(self, grade, api_key: str | None = None, reported: str | None = None, path: str | None = None):
        self.requests: list[dict] = []
        self.mode = "ok"
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if (path is not None and self.path != path) or (
                        api_key is not None and self.headers.get("Authorization") != f"Bearer {api_key}"):
                    return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                judge.requests.append(body)
                if judge.mode == "slow":
                    time.sleep(2)
                if judge.mode == "garbage":
                    return self._send(200, b"<html>upstream overloaded</html>")
                answer = grade(body)
                content, logprobs = answer if isinstance(answer, tuple) else (answer, None)
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content},
                          "logprobs": logprobs}
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0,
                                 "model": reported or body["model"], "choices": [choice],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, code, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def fake_judge():
    """Starts FakeJudge(grade, ...) endpoints for a test; each is shut down after it."""
    started: list[FakeJudge] = []

    def start(grade, **options) -> FakeJudge:
        started.append(FakeJudge(grade, **options))
        return started[-1]

    yield start
    for judge in started:
        judge.server.shutdown()
