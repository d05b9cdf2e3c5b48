"""s3:// sources and exports against a real S3-compatible server (versitygw, tests/s3server.py):
a stage reads its base model and datasets from a bucket (fetched once, reused), its final/ is
exported, read back byte for byte and loaded with transformers; bad credentials, a missing key
and a stopped server each fail naming the URI and never the secret; an export whose server stops
midway is retried, and is never marked complete while partial."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s3server  # noqa: E402

pytestmark = pytest.mark.skipif(s3server.binary() is None, reason=s3server.skip_reason())


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = s3server.S3Server(tmp_path_factory.mktemp("s3")).start()
    print(f"versitygw listening in {server.started_seconds:.2f} s")
    for bucket in ("models", "data", "exports"):
        server.make_bucket(bucket)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uploaded(s3, tiny_model, data_dir):
    s3.upload_dir(Path(tiny_model), "s3://models/tiny")
    s3.upload_file(data_dir / "sft.jsonl", "s3://data/chat/sft.jsonl")
    s3.upload_file(data_dir / "sft_test.jsonl", "s3://data/chat/sft_test.jsonl")
    return Path(tiny_model)


def _recipe(d: Path, s3, model: str, datasets: list[str], **extra) -> str:
    recipe = {"method": "sft", "model": {"model_name_or_path": model, "torch_dtype": "float32"},
              "datasets": [{"path": p} for p in datasets], "output_dir": str(d / "run" / "sft"),
              "object_store": {"endpoint_url": s3.endpoint}, "termination_message_path": str(d / "termination-log"),
              "tracking": {"report_to": []}, "run_name": "s3", "stage_name": "sft", "base_model": model,
              "training": {"max_steps": 3, "per_device_train_batch_size": 8, "max_length": 64, "save_steps": 100,
                           "logging_steps": 1, "learning_rate": 1e-3}, **extra}
    d.mkdir(parents=True, exist_ok=True)
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(d / "recipe.yaml")


def _main(recipe: str, env: dict, monkeypatch) -> tuple[int, dict]:
    from alignment_trainer.__main__ import main

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main([recipe])
    log = Path(yaml.safe_load(Path(recipe).read_text())["termination_message_path"])
    return code, json.loads(log.read_text()) if log.exists() else {}


def _same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names, f"nothing under {a}"
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and
                           not p.name.startswith(("_EXPORT", ".")))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def test_a_stage_reads_model_and_data_from_s3_once_and_its_final_model_is_exported(
        s3, uploaded, data_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignment_trainer import objectstore
    from alignment_trainer.recipe import load_recipe

    recipe = _recipe(tmp_path, s3, "s3://models/tiny", ["s3://data/chat/sft.jsonl"],
                     test_datasets=[{"path": "s3://data/chat/sft_test.jsonl"}])
    code, result = _main(recipe, s3.env(), monkeypatch)
    assert code == 0, result
    sources = tmp_path / "run" / "sources"
    _same_files(uploaded, sources / "models" / "tiny")  # fetched whole, into the run's directory
    assert (sources / "data" / "chat" / "sft.jsonl").read_bytes() == (data_dir / "sft.jsonl").read_bytes()
    assert json.loads((sources / "models" / "tiny.fetched.json").read_text())["files"] >= 3
    final = tmp_path / "run" / "sft" / "final"
    assert (final / "model.safetensors").exists() and result.get("global_step") == 3, result

    # Reused, not fetched again: with the server stopped, a later stage's sources resolve from the volume.
    s3.stop()
    try:
        again = objectstore.fetch_sources(load_recipe(recipe))
        assert again.model.model_name_or_path == str(sources / "models" / "tiny")
        assert again.base_model == "s3://models/tiny"  # provenance keeps the URI (the model card)
    finally:
        s3.start()

    exported = objectstore.export(final, "s3://exports/tiny-sft", endpoint_url=s3.endpoint)
    assert exported["uri"] == "s3://exports/tiny-sft" and exported["attempts"] == 1
    assert exported["bytes"] == sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    manifest = objectstore.exported("s3://exports/tiny-sft", endpoint_url=s3.endpoint)
    assert f"sha256:{manifest['sha256']}" == exported["digest"]
    back = tmp_path / "downloaded"
    client = s3.client()  # the test's own client, not the trainer's
    for entry in manifest["files"]:
        (back / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        client.download_file("exports", f"tiny-sft/{entry['path']}", str(back / entry["path"]))
    names = _same_files(final, back)
    assert "model.safetensors" in names and "config.json" in names
    model = AutoModelForCausalLM.from_pretrained(back)
    assert model.num_parameters() > 0


@pytest.mark.parametrize("case", ["bad credentials", "missing key", "stopped server"])
def test_a_source_that_cannot_be_read_fails_the_stage_naming_the_uri_not_the_secret(
        s3, uploaded, tmp_path, monkeypatch, case):
    env, model, endpoint = s3.env(), "s3://models/tiny", s3.endpoint
    if case == "bad credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + s3.secret_key[:8]
    elif case == "missing key":
        model = "s3://models/no-such-model"
    else:
        endpoint = f"http://127.0.0.1:{s3server.free_port()}"  # nothing listens there
        env["ALIGNMENT_S3_MAX_ATTEMPTS"] = "2"
    recipe = _recipe(tmp_path, s3, model, ["s3://data/chat/sft.jsonl"], object_store={"endpoint_url": endpoint})
    code, result = _main(recipe, env, monkeypatch)
    expected = {"bad credentials": (2, "ObjectStoreError", "refused the credentials"),
                "missing key": (2, "ObjectStoreError", "no such object"),
                "stopped server": (1, "ObjectStoreUnreachable", "did not answer")}[case]
    assert (code, result["reason"]) == expected[:2], result
    assert model in result["error"] and endpoint in result["error"] and expected[2] in result["error"], result
    text = json.dumps(result)
    assert s3.secret_key[:8] not in text and s3.access_key not in text
    assert not (tmp_path / "run" / "sources" / "models" / "tiny.fetched.json").exists()


def test_an_export_whose_server_stops_midway_is_retried_and_never_marked_complete_while_partial(
        s3, uploaded, tmp_path, monkeypatch):
    from alignment_trainer import objectstore

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)

    def stop_after_first(restart_after: float | None):
        seen = []

        def log(line):
            seen.append(line)
            if "1/" in line and "verified" in line and len([x for x in seen if "verified" in x]) == 1:
                s3.stop()
                if restart_after is not None:
                    threading.Timer(restart_after, s3.start).start()
        return log, seen

    # Stopped for good: the export fails naming the URI, and no completion manifest exists.
    log, seen = stop_after_first(None)
    with pytest.raises(objectstore.ObjectStoreUnreachable, match="s3://exports/held"):
        objectstore.export(uploaded, "s3://exports/held", endpoint_url=s3.endpoint, attempts=2, log=log)
    s3.start()
    assert any("try 2 of 2" in line for line in seen), seen
    assert objectstore.exported("s3://exports/held", endpoint_url=s3.endpoint) is None
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="exports", Prefix="held/").get("Contents", [])]
    assert keys and "held/_EXPORT_COMPLETE.json" not in keys  # a part was written, none marked complete

    # Back within the retry: the export finishes, verified, then marked complete.
    log, seen = stop_after_first(0.5)
    done = objectstore.export(uploaded, "s3://exports/retried", endpoint_url=s3.endpoint, attempts=3, log=log)
    assert done["attempts"] >= 2, seen
    manifest = objectstore.exported("s3://exports/retried", endpoint_url=s3.endpoint)
    assert manifest is not None and len(manifest["files"]) == done["files"]


def test_the_export_tool_the_operators_job_runs_exports_and_says_why_it_cannot(s3, tmp_path, monkeypatch, capsys):
    from alignment_trainer import export

    model = tmp_path / "final"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    log = tmp_path / "termination-log"
    spec = {"model": str(model), "exports": [{"uri": "s3://exports/tool"}], "termination_message_path": str(log),
            "object_store": {"endpoint_url": s3.endpoint}}
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    assert export.main([json.dumps(spec)]) == 0  # the spec inline, as the Job passes it
    done = json.loads(log.read_text())["exports"][0]
    assert (done["uri"], done["files"], done["bytes"]) == ("s3://exports/tool", 2, 16384 + 23)
    assert s3.client().get_object(Bucket="exports", Key="tool/model.safetensors")["Body"].read() == \
        (model / "model.safetensors").read_bytes()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    spec["exports"] = [{"uri": "s3://exports/refused"}]
    assert export.main([json.dumps(spec)]) == 2
    failure = json.loads(log.read_text())
    assert failure["reason"] == "ObjectStoreError" and "s3://exports/refused" in failure["error"]
    assert "wrong" not in failure["error"] and s3.secret_key not in capsys.readouterr().out


def test_the_exported_card_is_the_evals_card_listing_where_the_model_was_exported(s3, tmp_path, monkeypatch):
    """The export tool as both shells run it for a promoted model: every file of final/ byte for byte but
    README.md, which is the card the eval that chose it wrote (its results) plus the URIs it was exported to
    and the store's endpoint, no credential in them; the manifest holds what was written."""
    from huggingface_hub import ModelCard

    from alignment_trainer import export
    from test_model_card import recipes, tiny_run, write_cards

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-model").mkdir(parents=True)
    eval_card = write_cards(tmp_path, *recipes(tiny_run(), str(tmp_path / "runs")))
    final = eval_card.parent.parent / "dpo" / "final"
    (final / "config.json").write_text('{"model_type": "llama"}')
    uris = ["s3://exports/carded", "s3://exports/carded-copy/"]
    spec = {"model": str(final), "exports": [{"uri": uris[0]}], "object_store": {"endpoint_url": s3.endpoint},
            "card": {"from": str(eval_card), "uris": uris}}
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    assert export.main([json.dumps(spec)]) == 0
    client = s3.client()
    get = lambda key: client.get_object(Bucket="exports", Key=key)["Body"].read()  # noqa: E731
    assert get("carded/config.json") == (final / "config.json").read_bytes()
    card = ModelCard(get("carded/README.md").decode())
    meta = card.data.to_dict()["alignment_operator"]
    assert meta["exports"] == ["s3://exports/carded", "s3://exports/carded-copy"]
    assert meta["export_endpoint"] == s3.endpoint and [s["stage"] for s in meta["stages"]] == ["sft", "dpo"]
    assert card.data.eval_results and "## Exports" in card.text and "- `s3://exports/carded-copy`" in card.text
    assert "## Evaluation" in card.text  # the eval's card: the results that promoted it
    assert s3.secret_key not in card.content and s3.access_key not in card.content
    manifest = json.loads(get("carded/_EXPORT_COMPLETE.json"))
    written = {f["path"]: f["bytes"] for f in manifest["files"]}
    assert written == {"config.json": 23, "README.md": len(get("carded/README.md"))}
