"""Experiment tracking: one tiny stage logs to TensorBoard (read back with tensorboard's own
reader), a real `mlflow server` started here (queried for its loss curve) and W&B in offline mode
(its run directory's transaction log read with wandb's own protobuf records); each holds the
numbers of metrics.jsonl, and result.json and the model card link the tracked run."""

from __future__ import annotations

import json
import math
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MLFLOW = REPO / ".venv" / "mlflow-server" / "bin" / "mlflow"  # scripts/setup makes it (its own venv)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    if not MLFLOW.exists():
        pytest.skip(f"{MLFLOW} is missing: scripts/setup installs the MLflow server")
    d = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--default-artifact-root", str(d / "artifacts")],
        stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read().strip() == b"OK":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): a 7-byte header (':W&B', 0xBEE1, version),
    then LevelDB-log blocks of 32 KiB holding checksummed chunks of wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_a_stage_logs_the_same_numbers_to_tensorboard_mlflow_and_wandb(tmp_path, tiny_model, data_dir, kit,
                                                                      mlflow_server):
    recipe = kit.write_recipe(
        tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
        training={"max_steps": 4, "logging_steps": 1, "per_device_train_batch_size": 4, "max_length": 64,
                  "save_steps": 100},
        tracking={"report_to": ["tensorboard", "mlflow", "wandb"], "mlflow_tracking_uri": mlflow_server,
                  "mlflow_experiment": "tracking-test", "wandb_project": "tracking-test", "wandb_mode": "offline"})
    kit.run_subprocess([sys.executable, "-m", "alignment_trainer", recipe],
                       env={"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}, timeout=600)
    out = tmp_path / "out"
    expected = {m["step"]: m["loss"] for m in kit.metrics(out) if "loss" in m}
    assert sorted(expected) == [1, 2, 3, 4] and all(math.isfinite(v) for v in expected.values())
    result = json.loads((out / "result.json").read_text())
    links = result["tracking"]

    # TensorBoard: event files on the volume, read by tensorboard itself (values are float32).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert links["tensorboard"] == str(out / "tensorboard")
    events = EventAccumulator(links["tensorboard"])
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb.keys() == expected.keys()
    assert all(math.isclose(tb[s], expected[s], rel_tol=1e-6) for s in expected)

    # MLflow: the server has the run, named <run>/<stage>, with the same loss curve.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["test/sft"]  # final evaluation went into the same run
    run = runs[0]
    assert run.data.tags["alignment.dev/stage"] == "sft" and run.info.status == "FINISHED"
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert curve.keys() == expected.keys()
    assert all(math.isclose(curve[s], expected[s], rel_tol=1e-9) for s in expected)
    assert links["mlflow"] == f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"

    # W&B offline: the run directory under the output dir holds the history.
    run_dir = Path(links["wandb"])
    assert run_dir.parent == out / "wandb" and run_dir.name.startswith("offline-run-")
    history = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in item:
                history[item["train/global_step"]] = item["train/loss"]
        if record.WhichOneof("record_type") == "run":
            assert record.run.display_name == "test/sft" and record.run.project == "tracking-test"
    assert history.keys() == expected.keys()
    assert all(math.isclose(history[s], expected[s], rel_tol=1e-9) for s in expected)

    card = (out / "final" / "README.md").read_text()
    # a tracked run's URL is on the card; W&B's offline directory is a path on this machine: not
    assert f"- mlflow: {links['mlflow']}" in card and str(run_dir) not in card and str(out) not in card
