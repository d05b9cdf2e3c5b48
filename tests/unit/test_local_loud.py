"""`alignctl run --local` never succeeds silently, and what only a cluster needs is not asked of a laptop
(issue 28): a stage whose child exits 0 without its result fails the run; spec.hub takes the token as
huggingface_hub finds one (HF_TOKEN, else the `hf auth login` token) and is refused before any stage
trains when there is none, while the cluster keeps requiring trainer.hfTokenSecretRef."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.local import runner

ROOT = Path(__file__).resolve().parents[2]


def tiny(tmp_path: Path, **spec) -> Path:
    """examples/tiny-run.yaml, sources absolute, a model directory that passes the path checks."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    model = tmp_path / "tiny-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    doc["spec"]["model"]["source"] = str(model)
    for stage in doc["spec"]["stages"]:
        for d in stage.get("datasets", []) + stage.get("testDatasets", []):
            d["source"] = str(ROOT / d["source"])
    doc["spec"].update(spec)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_stage_whose_child_exits_0_without_its_result_fails_the_run(tmp_path, monkeypatch, capsys):
    """A child that ends well but leaves no result (result.json and its outcome are written together) is
    no success: its model and metrics are unknown, and the next stage would start from nothing."""
    ran = []

    def child(run, index, recipe_path, *args, **kwargs):  # the trainer's place, exiting 0 having written nothing
        ran.append(run.spec.stages[index].name)
        return [sys.executable, "-c", "print('training... done')"], {}

    monkeypatch.setattr(runner, "stage_command", child)
    code = runner.run_local(str(tiny(tmp_path)), workdir=str(tmp_path / "runs"))
    assert ran == ["sft"], "the stage ran, and nothing after it"
    assert code == 1
    status = json.loads(next((tmp_path / "runs").rglob("status.json")).read_text())
    sft = status["stages"][0]
    assert (status["phase"], sft["phase"]) == ("Failed", "Failed"), status
    assert "exit code 0): exited 0 without writing its result (result.json" in sft["message"], sft
    assert not list((tmp_path / "runs").rglob("result.json"))
    said = " ".join("".join(capsys.readouterr()).split())  # the summary's failure lines go to stderr
    assert "stage sft failed: Error (exit code 0): exited 0 without writing its result" in said, said


def test_spec_hub_locally_takes_hf_token_or_the_login_and_the_cluster_still_needs_the_secret(tmp_path, monkeypatch):
    hub = {"hub": {"repoId": "me/tiny-zephyr"}}
    path = tiny(tmp_path, **hub)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # where `hf auth login` stores its token
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    login = tmp_path / "hf" / "token"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(RunInvalid, match=r"spec.hub: pushing to me/tiny-zephyr needs a Hugging Face token .* set "
                                         r"HF_TOKEN or run `hf auth login`"):
        runner.read_run(str(path))  # before any stage trains, not after the last one
    (tmp_path / "exported").mkdir()
    exported = tiny(tmp_path / "exported", promote={"exports": [{"uri": "hf://me/tiny-zephyr"}]})
    with pytest.raises(RunInvalid, match=r"spec.promote.exports: exporting to hf://me/tiny-zephyr needs a Hugging "
                                         r"Face token .* set HF_TOKEN"):
        runner.read_run(str(exported))  # promote.exports' Hub push, the same
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    assert runner.read_run(str(exported)).spec.promote.exports[0].uri == "hf://me/tiny-zephyr"
    assert runner.read_run(str(path)).spec.hub.repo_id == "me/tiny-zephyr"
    monkeypatch.delenv("HF_TOKEN")
    login.parent.mkdir()
    login.write_text("hf_from_the_login\n")  # what `hf auth login` stores
    assert runner.read_run(str(path)).spec.trainer.hf_token_secret_ref is None
    # the lookup the trainer makes (huggingface_hub's get_token in a fresh process) finds that same token
    found = subprocess.run([sys.executable, "-c", "from huggingface_hub import get_token; print(get_token())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == "hf_from_the_login"
    # A cluster has only the Secret: the API server and the operator still refuse it without the ref.
    with pytest.raises(RunInvalid, match="hub: pushing needs trainer.hfTokenSecretRef"):
        parse_run(yaml.safe_load(path.read_text()))
