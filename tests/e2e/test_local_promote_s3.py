"""`alignctl run --local` with its base model and datasets in a real S3-compatible server (versitygw,
tests/s3server.py) and spec.promote: held by a gate the tiny model misses (phase Held, exit 1, the gate's
value in the summary and status.json, nothing exported), then, with the gate lowered (--set, the stages
not run again), promoted and exported: the bucket holds final/ byte for byte but its card, which is the
eval's card listing the export, marked complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s3server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
ALIGNCTL = str(Path(sys.executable).with_name("alignctl"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.skipif(s3server.binary() is None, reason=s3server.skip_reason())


def test_a_run_reads_from_s3_is_held_by_a_gate_then_promoted_and_exported(tmp_path, tiny_model):
    model = tiny_model
    with s3server.S3Server(tmp_path / "s3") as s3:
        for bucket in ("models", "data", "exports"):
            s3.make_bucket(bucket)
        s3.upload_dir(model, "s3://models/tiny")
        for name in ("sft.jsonl", "prefs_test.jsonl"):
            s3.upload_file(DATA / name, f"s3://data/tiny/{name}")
        run = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "s3"},
               "spec": {"model": {"source": "s3://models/tiny", "dtype": "float32"},
                        "objectStore": {"endpointUrl": s3.endpoint},
                        "stages": [
                            {"name": "sft", "method": "sft", "datasets": [{"source": "s3://data/tiny/sft.jsonl"}],
                             "training": {"maxSteps": 4, "perDeviceBatchSize": 8, "maxLength": 96,
                                          "learningRate": 2e-3, "gradientCheckpointing": False},
                             "resources": {"gpusPerNode": 0}, "distributed": "ddp"},
                            {"name": "eval", "method": "eval",
                             "datasets": [{"source": "s3://data/tiny/prefs_test.jsonl"}],
                             "training": {"perDeviceBatchSize": 16, "maxLength": 96},
                             "resources": {"gpusPerNode": 0}, "distributed": "ddp"}],
                        "promote": {"gates": [{"metric": "preference_accuracy", "min": 1.01}],
                                    "exports": [{"uri": "s3://exports/tiny-sft"}]}}}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run))
        env = {**ENV, **s3.env()}
        cmd = [ALIGNCTL, "run", "--local", str(path), "--workdir", str(tmp_path / "runs")]
        held = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        out = held.stdout + held.stderr
        assert held.returncode == 1, out
        run_dir = tmp_path / "runs" / "default" / "s3"
        status = json.loads((run_dir / "status.json").read_text())
        assert status["phase"] == "Held", out
        gate = status["promotion"]["gates"][0]
        assert gate["passed"] is False and 0 <= gate["value"] <= 1 and gate["threshold"] == 1.01
        assert "PROMOTION: Held" in out and "FAILED" in out
        assert (run_dir / "sources" / "models" / "tiny" / "config.json").is_file()  # fetched into the run
        client = s3.client()
        assert client.list_objects_v2(Bucket="exports").get("KeyCount", 0) == 0  # a held model is not exported

        promoted = subprocess.run([*cmd, "--set", "promote.gates[0].min=0.0"], env=env, capture_output=True,
                                  text=True, timeout=600, cwd=tmp_path)
        out = promoted.stdout + promoted.stderr
        assert promoted.returncode == 0, out
        status = json.loads((run_dir / "status.json").read_text())
        p = status["promotion"]
        assert (status["phase"], p["verdict"], p["stage"]) == ("Succeeded", "Promoted", "sft"), out
        exported = p["exports"][0]
        assert exported["uri"] == "s3://exports/tiny-sft" and exported["digest"].startswith("sha256:")
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions["Promoted"] == "True" and conditions["Exported"] == "True"
        final = run_dir / "sft" / "final"
        files = sorted(q.relative_to(final).as_posix() for q in final.rglob("*") if q.is_file())
        for name in files:
            body = client.get_object(Bucket="exports", Key=f"tiny-sft/{name}")["Body"].read()
            if name == "README.md":  # the eval's card of sft (its results), listing where the model went
                card = body.decode()
                assert "- `s3://exports/tiny-sft`" in card and "preference_accuracy" in card, card
                assert s3.endpoint in card and s3.secret_key not in card and s3.access_key not in card
            else:
                assert body == (final / name).read_bytes(), name
        manifest = json.loads(client.get_object(Bucket="exports", Key="tiny-sft/_EXPORT_COMPLETE.json")["Body"].read())
        assert sorted(f["path"] for f in manifest["files"]) == files
        assert s3.secret_key not in out and s3.secret_key not in (run_dir / "status.json").read_text()
