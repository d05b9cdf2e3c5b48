"""The final model's card and the Hub push (alignment_trainer.card), on the recipes the operator renders.

The tiny run (examples/tiny-run.yaml: sft -> dpo -> eval) is rendered with spec.hub set; each stage's
card is built from its recipe and written where the trainer writes it, and the eval stage's card
from an eval result.json of the tiny run's shape. The push is exercised twice: with HfApi's two
network calls (create_repo, create_commit) replaced by recorders whose arguments are asserted, and
over HTTP against HubStandIn, a real local server (stdlib http.server) answering the four Hub API
endpoints huggingface_hub's client calls for it (repo create, validate-yaml, preupload, ndjson
commit; every file 'regular', so no LFS/Xet upload path is exercised).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# examples/tiny-run.yaml's eval result.json, as a finished local run wrote it (numbers from one)
EVAL_RESULT = {
    "method": "eval", "stage": "eval", "checkpoint": "runs/default/tiny/dpo/final",
    "reference_model": "runs/default/tiny/sft/final", "pairs": 60, "reference_logps_reused": False,
    "reference_pass_s": 0.585, "preference_accuracy": 0.8667, "reward_margin": 0.3696, "reward_chosen": 0.1272,
    "reward_rejected": -0.2424, "reward_beta": 0.1, "logp_accuracy": 0.4167, "reference_logp_accuracy": 0.3667,
    "scored_pairs": 60, "unscored_pairs": 0, "eval_loss": 3.8088, "perplexity": 45.09,
    "reference_perplexity": 54.74, "eval_tokens": 394, "generation_stop_rate": 0.375, "generations": "x.jsonl",
    "files": None, "provenance": None, "nan_metric": float("nan"),
}


def tiny_run(**spec):
    from alignment_operator.api.documents import parse_run

    data = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    data["spec"].update(spec)
    return parse_run(data)


def recipes(run, root):
    from alignment_operator.render.recipe import build_recipe

    return [build_recipe(run, i, root) for i in range(len(run.spec.stages))]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The directory a local run works in: runs/tiny-model is a local model directory there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-model").mkdir(parents=True)
    return tmp_path


HUB = {"hub": {"repoId": "my-org/tiny-zephyr"}, "trainer": {"hfTokenSecretRef": {"name": "hf-token"}}}


def write_cards(root: Path, sft, dpo, ev):
    """What the stages write: sft's and dpo's final/README.md, then the eval stage's card."""
    from alignment_trainer import card

    for recipe, steps in ((sft, 36), (dpo, 8)):
        final = Path(recipe.output_dir) / "final"
        final.mkdir(parents=True)
        tracked = {"tensorboard": str(Path(recipe.output_dir) / "tensorboard"),
                   "mlflow": "http://mlflow.example:5000/#/experiments/1/runs/abc"}
        card.stage_card(recipe, steps, tracked).save(final / "README.md")
    out = Path(ev.output_dir)
    out.mkdir(parents=True)
    card.eval_card(ev, EVAL_RESULT).save(out / "README.md")
    return out / "README.md"


def test_tiny_run_card_has_base_model_datasets_every_stage_and_eval_results(workdir):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    root = workdir / "volume"
    sft, dpo, ev = recipes(tiny_run(**HUB), str(root))
    path = write_cards(root, sft, dpo, ev)
    text = path.read_text()
    print(text)  # the rendered card (pytest -s shows it)

    # every stage's recipe, in order, each with its method and key hyperparameters
    assert "## Stage 1: sft (sft)" in text and "## Stage 2: dpo (dpo, loss sigmoid)" in text
    assert "learning rate 0.002, cosine schedule, 6.0 epochs, 36 optimizer steps" in text
    assert "learning rate 0.0005" in text and "beta 0.1" in text
    assert "- data: sft.jsonl (split train)" in text and "- data: prefs.jsonl (split train)" in text
    assert "Fine-tuned from `tiny-model` at revision `main` by alignment-operator (run `tiny`), in 2 stages." in text
    assert "- mlflow: http://mlflow.example:5000/#/experiments/1/runs/abc" in text
    # no machine paths: not the volume, not the working directory, not the tensorboard directory
    assert str(workdir) not in text and "/tensorboard" not in text and "runs/default" not in text
    assert "[None]" not in text

    # the Hub parses it back: metadata and model-index
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["tags"] == ["alignment-operator", "trl", "sft", "dpo"] and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # a local directory is no Hub id: named in alignment_operator only
    ops = meta["alignment_operator"]
    assert ops["base_model"] == "tiny-model" and ops["base_model_revision"] == "main" and ops["run"] == "tiny"
    assert [(s["stage"], s["method"]) for s in ops["stages"]] == [("sft", "sft"), ("dpo", "dpo")]
    assert ops["stages"][0]["per_device_batch_size"] == 16 and ops["stages"][1]["beta"] == 0.1
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "my-org/tiny-zephyr"
    values = {r.metric_type: r.metric_value for r in results}
    assert values == {"preference_accuracy": 0.8667, "reward_margin": 0.3696, "reward_chosen": 0.1272,
                      "reward_rejected": -0.2424, "logp_accuracy": 0.4167, "eval_loss": 3.8088,
                      "perplexity": 45.09, "generation_stop_rate": 0.375}  # no counts, no reference, no NaN
    assert {r.dataset_name for r in results} == {"prefs_test.jsonl"}
    assert "| preference_accuracy | 0.8667 |" in text


def test_hub_ids_are_named_with_the_base_revision(workdir):
    """A Hub base model and Hub datasets are the card's base_model and datasets (the Hub links them)."""
    from huggingface_hub import ModelCard

    from alignment_trainer import card

    run = tiny_run(model={"source": "HuggingFaceH4/mistral-7b-sft-beta", "revision": "3f2ca9b", "dtype": "float32"})
    sft = recipes(run, str(workdir / "volume"))[0]
    sft = sft.model_copy(update={"datasets": [sft.datasets[0].model_copy(
        update={"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"})]})
    parsed = ModelCard(str(card.stage_card(sft, 10)))
    assert parsed.data.base_model == "HuggingFaceH4/mistral-7b-sft-beta"
    assert parsed.data.datasets == ["HuggingFaceH4/ultrachat_200k"]
    assert parsed.data.to_dict()["alignment_operator"]["base_model_revision"] == "3f2ca9b"
    assert "- data: HuggingFaceH4/ultrachat_200k (split train_sft)" in parsed.text


def test_spec_hub_renders_the_push_on_the_last_stage_and_needs_a_token(workdir):
    from alignment_operator.api.run import RunInvalid

    sft, dpo, ev = recipes(tiny_run(**HUB), str(workdir))
    assert [r.push_to_hub for r in (sft, dpo, ev)] == [False, False, True]  # eval holds the results
    assert ev.hub_model_id == "my-org/tiny-zephyr" and ev.hub_private is True
    assert sft.base_model_revision == "main"
    without_eval = tiny_run(**HUB)
    without_eval.spec.stages.pop()
    assert [r.push_to_hub for r in recipes(without_eval, str(workdir))] == [False, True]
    assert not any(r.push_to_hub for r in recipes(tiny_run(), str(workdir)))

    with pytest.raises(RunInvalid, match=r"hub: pushing needs trainer.hfTokenSecretRef"):
        tiny_run(hub={"repoId": "my-org/tiny-zephyr"})
    with pytest.raises(RunInvalid, match="spec.hub.repoId"):
        tiny_run(**{**HUB, "hub": {"repoId": "no-org"}})


class Recorder:
    """HfApi's create_repo and create_commit, recording their arguments instead of calling the Hub."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoUrl

        self.calls = []

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", api.token, repo_id, kw))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, **kw):
            self.calls.append(("create_commit", api.token, repo_id, operations, kw))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_eval_stage_push_uploads_the_evaluated_model_with_its_results_card(workdir, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    from alignment_trainer import card
    from alignment_trainer.results import push_to_hub

    root = workdir / "volume"
    sft, dpo, ev = recipes(tiny_run(**HUB), str(root))
    write_cards(root, sft, dpo, ev)
    final = Path(dpo.output_dir) / "final"
    (final / "model.safetensors").write_bytes(b"weights")
    (final / "config.json").write_text(json.dumps({"model_type": "llama"}))
    eval_card = card.eval_card(ev, EVAL_RESULT)
    recorder = Recorder(monkeypatch)

    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(workdir / "no-login" / "token"))  # nor a stored login
    with pytest.raises(ValueError, match="HF_TOKEN is not set and no `hf auth login` token is stored"):
        push_to_hub(ev, final, eval_card)
    assert recorder.calls == []  # refused before any call
    assert push_to_hub(sft, final) is None and recorder.calls == []  # a stage that does not push

    monkeypatch.setenv("HF_TOKEN", "hf_secret_do_not_print")
    assert push_to_hub(ev, final, eval_card) == "https://huggingface.co/my-org/tiny-zephyr"
    (create, token, repo, kw), (commit, token2, repo2, operations, kw2) = recorder.calls
    assert (create, token, repo, kw) == ("create_repo", "hf_secret_do_not_print", "my-org/tiny-zephyr",
                                         {"exist_ok": True, "private": True})
    assert (commit, token2, repo2) == ("create_commit", "hf_secret_do_not_print", "my-org/tiny-zephyr")
    assert kw2["commit_message"] == "alignment-operator: tiny stage eval"
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]  # one README: the eval card
    assert uploaded["model.safetensors"] == str(final / "model.safetensors")
    readme = ModelCard(uploaded["README.md"].decode())
    assert {r.metric_type for r in readme.data.eval_results} >= {"preference_accuracy", "perplexity"}
    assert (final / "README.md").read_text() != uploaded["README.md"].decode()  # dpo's final/ left as written
    out = capsys.readouterr()
    assert "hf_secret_do_not_print" not in out.out + out.err


def test_training_stage_push_uploads_its_final_folder_as_written(workdir, monkeypatch):
    from alignment_trainer.results import push_to_hub

    run = tiny_run(**HUB)
    run.spec.stages.pop()
    sft, dpo = recipes(run, str(workdir / "volume"))
    final = Path(dpo.output_dir) / "final"
    (final / "sub").mkdir(parents=True)
    (final / "README.md").write_text("the dpo card")
    (final / "sub" / "tokenizer.json").write_text("{}")
    recorder = Recorder(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert push_to_hub(dpo, final) == "https://huggingface.co/my-org/tiny-zephyr"
    operations = recorder.calls[1][3]
    assert {op.path_in_repo: op.path_or_fileobj for op in operations} == {
        "README.md": str(final / "README.md"), "sub/tokenizer.json": str(final / "sub" / "tokenizer.json")}


def test_a_starting_model_with_someone_elses_card_starts_the_list(workdir):
    """A downloaded model's own card (or one whose metadata does not parse) names no earlier stages."""
    from alignment_trainer import card

    sft = recipes(tiny_run(), str(workdir / "volume"))[0]
    model = workdir / "runs" / "tiny-model"
    for readme in ("---\nlicense: apache-2.0\nbase_model: meta-llama/Llama-2-7b\n---\n# Llama\n",
                   "---\nlicense: [unclosed\n---\n# broken\n"):
        (model / "README.md").write_text(readme)
        meta = card.stage_card(sft, 5).data.to_dict()
        assert [s["stage"] for s in meta["alignment_operator"]["stages"]] == ["sft"]
        assert meta["alignment_operator"]["base_model"] == "tiny-model" and "base_model" not in meta


class HubStandIn:
    """A real HTTP server (stdlib) answering the Hub API calls a push makes: repo creation, preupload
    (every file 'regular': sent inline in the commit) and the ndjson commit. It keeps what it got."""

    def __init__(self):
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests, self.files, self.repos = [], {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((self.path.split("?")[0], self.headers.get("Authorization")))
                if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before a commit
                    from huggingface_hub import ModelCard
                    from huggingface_hub.repocard_data import model_index_to_eval_results

                    try:
                        data = ModelCard(json.loads(body)["content"]).data.to_dict()
                        hub.validated = model_index_to_eval_results(data["model-index"])
                    except Exception as e:  # noqa: BLE001 - the answer names it
                        return self.answer(400, {"error": str(e)})
                    return self.answer(200, {})
                if self.headers.get("Authorization") != "Bearer hf_stand_in":
                    return self.answer(401, {"error": "Invalid credentials"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo = f"{request.get('organization')}/{request['name']}"
                    hub.repos.append((repo, request.get("visibility")))
                    return self.answer(200, {"url": f"{hub.url}/{repo}"})
                if parts[0] == "api" and parts[1] == "models" and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self.answer(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if parts[0] == "api" and parts[1] == "models" and parts[4] == "commit":
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "header":
                            hub.summary = item["value"]["summary"]
                    return self.answer(200, {"commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/1",
                                             "commitOid": "1" * 40, "pullRequestUrl": None})
                return self.answer(404, {"error": f"not served: {self.path}"})

            def answer(self, code, data):
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_push_reaches_a_hub_stand_in_server(workdir, monkeypatch):
    """The push over HTTP to a local server speaking the Hub's API (huggingface_hub's own client, no
    recorder): the repository created private, final/ committed with the eval card as README.md."""
    from huggingface_hub import ModelCard, constants

    from alignment_trainer import card
    from alignment_trainer.results import push_to_hub

    hub = HubStandIn()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the trainer tests' default is offline
        root = workdir / "volume"
        sft, dpo, ev = recipes(tiny_run(**HUB), str(root))
        write_cards(root, sft, dpo, ev)
        final = Path(dpo.output_dir) / "final"
        (final / "model.safetensors").write_bytes(b"weights")
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(Exception, match="401"):
            push_to_hub(ev, final, card.eval_card(ev, EVAL_RESULT))
        assert hub.files == {} and hub.requests  # the server answered and refused

        monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
        url = push_to_hub(ev, final, card.eval_card(ev, EVAL_RESULT))
        assert url == f"{hub.url}/my-org/tiny-zephyr" and hub.repos[-1] == ("my-org/tiny-zephyr", "private")
        assert sorted(hub.files) == ["README.md", "model.safetensors"] and hub.files["model.safetensors"] == b"weights"
        assert hub.summary == "alignment-operator: tiny stage eval"
        pushed = ModelCard(hub.files["README.md"].decode())
        assert {r.metric_type for r in pushed.data.eval_results} >= {"preference_accuracy", "reward_margin"}
        assert hub.validated[0] == "my-org/tiny-zephyr" and len(hub.validated[1]) == 8  # model-index checked
        assert [p for p, _ in hub.requests[-4:]] == [
            "/api/repos/create", "/api/validate-yaml", "/api/models/my-org/tiny-zephyr/preupload/main",
            "/api/models/my-org/tiny-zephyr/commit/main"]
    finally:
        hub.server.shutdown()


def test_a_push_refused_after_training_fails_the_stage_with_why_and_keeps_final(tmp_path, monkeypatch, kit, tiny_model,
                                                                                data_dir):
    """A real (3-step) sft stage whose push the Hub stand-in refuses (a token without write access): the stage
    fails, exit 2 (retrying with that token cannot help), saying the push failed, why (401) and where the
    trained model is; final/ is there, nothing reached the Hub, the token is in no word of it."""
    from huggingface_hub import constants

    from alignment_trainer import outcome
    from alignment_trainer.__main__ import main

    hub = HubStandIn()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_read_only_token")
        path = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                                training={"max_steps": 3, "per_device_train_batch_size": 8, "max_length": 48,
                                          "logging_steps": 1, "save_steps": 100},
                                push_to_hub=True, hub_model_id="my-org/tiny-push",
                                termination_message_path=str(tmp_path / "termination-log"))
        code = main([path])
    finally:
        hub.server.shutdown()
    said = outcome.decode((tmp_path / "termination-log").read_text())
    final = tmp_path / "out" / "final"
    assert (code, said["reason"], said["exit_code"]) == (2, "RecipeError", 2), said
    assert said["error"].startswith("push to the Hub repository my-org/tiny-push failed (HTTP 401: Invalid "
                                    "credentials); the trained model is kept in "), said
    assert f"the trained model is kept in {final}" in said["error"]
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert hub.requests and hub.files == {}  # the server was asked, and refused
    assert "hf_read_only_token" not in json.dumps(said)


def test_the_card_carries_each_stages_gpu_hours_as_the_operator_counted_them(tmp_path):
    """Issue 26: the card lists each earlier stage's GPU-hours (every attempt, from the run's status when
    the stage was rendered) and their sum; a CPU-only stage says so."""
    from alignment_operator.api.documents import parse_run
    from alignment_operator.render.recipe import build_recipe, final_dir
    from alignment_trainer import card

    def at(status: list[dict]):
        data = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
        data["status"] = {"stages": status}
        return parse_run(data)

    sft_done = {"name": "sft", "phase": "Succeeded", "gpus": 8, "gpuSeconds": 2 * 3600.0}
    for index, stages in ((0, []), (1, [sft_done]), (2, [sft_done, {"name": "dpo", "phase": "Succeeded", "gpus": 0}])):
        run = at(stages)
        recipe = build_recipe(run, index, str(tmp_path))
        if index < 2:
            final = Path(final_dir(str(tmp_path), run, run.spec.stages[index].name))
            final.mkdir(parents=True)
            card.stage_card(recipe, 10).save(final / "README.md")
    assert build_recipe(at([]), 0, str(tmp_path)).gpu_seconds is None  # nothing finished yet
    text = str(card.eval_card(recipe, {"preference_accuracy": 0.9}))
    body = text[text.index("## Stage 1"):]
    sft_part, dpo_part = body.split("## Stage 2")
    assert "- accelerator time: 2 GPU-hours, every attempt" in sft_part
    assert "- accelerator time: CPU only" in dpo_part
    assert "GPU-hours of the stages listed: 2" in text


def test_the_export_tool_pushes_a_promoted_model_to_the_hub_with_the_card_listing_its_exports(
        workdir, monkeypatch, capsys):
    """promote.exports' hf://org/name as the export Job runs it (python -m alignment_trainer.export, the spec
    inline) against HubStandIn: a refused token exits 2 naming the repository, nothing committed; with the
    token, final/ in one commit, README.md the eval's card (its results) listing both exports."""
    from huggingface_hub import ModelCard, constants

    from alignment_trainer import export

    hub = HubStandIn()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        root = workdir / "volume"
        sft, dpo, ev = recipes(tiny_run(), str(root))
        eval_card = write_cards(root, sft, dpo, ev)
        final = Path(dpo.output_dir) / "final"
        (final / "model.safetensors").write_bytes(b"weights")
        log = workdir / "termination-log"
        spec = {"model": str(final), "exports": [{"uri": "hf://my-org/tiny-promoted", "private": False}],
                "card": {"from": str(eval_card), "uris": ["s3://exports/tiny", "hf://my-org/tiny-promoted"]},
                "termination_message_path": str(log)}
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        assert export.main([json.dumps(spec)]) == 2
        failure = json.loads(log.read_text())
        assert "my-org/tiny-promoted" in failure["error"] and "401" in failure["error"] and hub.files == {}
        assert "hf_wrong" not in capsys.readouterr().out

        monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
        assert export.main([json.dumps(spec)]) == 0
        done = json.loads(log.read_text())["exports"][0]
        assert done["uri"] == "hf://my-org/tiny-promoted" and done["digest"].startswith("sha256:")
        assert done["files"] == 2 and hub.repos[-1] == ("my-org/tiny-promoted", "public")
        assert sorted(hub.files) == ["README.md", "model.safetensors"] and hub.files["model.safetensors"] == b"weights"
        pushed = ModelCard(hub.files["README.md"].decode())
        listed = pushed.data.to_dict()["alignment_operator"]["exports"]
        assert listed == ["s3://exports/tiny", "hf://my-org/tiny-promoted"]
        assert {r.metric_type for r in pushed.data.eval_results} >= {"preference_accuracy"}
        assert "- `hf://my-org/tiny-promoted`: the Hugging Face Hub" in pushed.text
    finally:
        hub.server.shutdown()
