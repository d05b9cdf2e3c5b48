"""The AlignmentRun API: examples validate, bad manifests are refused with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import AlignmentRun, RunInvalid, parse_run
from alignment_operator.cli import main as alignctl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "manifests" / "bad").glob("*.yaml"))


def header(path: Path, key: str) -> str | None:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return None


def test_there_are_examples_and_many_bad_manifests():
    assert {p.name for p in EXAMPLES} >= {"zephyr-run.yaml", "tiny-run.yaml", "kto-lora-run.yaml"}
    assert len(BAD) >= 15
    assert all(header(p, "expect") for p in BAD), "every bad manifest says which field must be named"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path, capsys):
    assert alignctl(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok  {path}")


def rule(path: Path) -> str:
    """The words both the API server and `alignctl validate` refuse a bad manifest in (as
    tests/cluster/test_crd_server.py reads them): `# rule:`, else server-expect past "Invalid value: ", else expect."""
    server = header(path, "server-expect") or ""
    return header(path, "rule") or server.rpartition("Invalid value: ")[2] or header(path, "expect")


# Each bad manifest breaks one rule. The API server refuses all but those only the operator can judge (a
# matrix's variant names: `# server: accepts`), in the same words as `alignctl validate`
# (tests/cluster/test_crd_server.py::test_bad_manifest_is_refused_naming_the_field holds that on a real one).
SERVER_REFUSED = [p for p in BAD if not (header(p, "server") or "").startswith("accepts")]


def test_the_rules_the_api_server_and_alignctl_share_are_counted():
    """A rule added or dropped changes the count: update it with its manifest."""
    assert (len(SERVER_REFUSED), len(BAD) - len(SERVER_REFUSED)) == (87, 1)


def test_every_cel_rule_of_the_crd_is_a_rule_of_a_table_with_its_python_test():
    """One table per object (api.rules, api.corev1.RULES, api.admission, the run's name): each CEL rule of the
    CRD is a Rule holding the same test in Python, which `alignctl validate` evaluates; only field bounds
    pydantic checks itself (a quantity, a fractional exclusive maximum) are CEL alone."""
    from alignment_operator.api import admission, corev1, rules, run
    from alignment_operator.api.spec import MatrixSpec
    from alignment_operator.crd import build_crd

    def cel(node):
        if isinstance(node, dict):
            yield from (r["rule"] for r in node.get("x-kubernetes-validations", []))
            node = list(node.values())
        for sub in node if isinstance(node, list) else []:
            yield from cel(sub)

    tables = [table() for name, table in vars(rules).items()
              if name.endswith("_rules") and not name.startswith("_") and name != "matrix_size_rules"]
    tables += [rules.matrix_size_rules([f.alias for f in MatrixSpec.model_fields.values()]), *corev1.RULES.values(),
               admission.MOUNT_RULES, admission.IMAGE_RULES, admission.NODE_SELECTOR_RULES, [run.RUN_NAME_RULE]]
    table = {r.cel for t in tables for r in t}
    in_crd = set(cel(build_crd()))
    bounds = {r for r in in_crd if r.startswith("self < ") or "isQuantity(self)" in r}
    assert bounds and in_crd - table == bounds and table <= in_crd
    assert (len(table), len(bounds)) == (88, 2), "a rule added or dropped: update the count"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_manifest_is_refused_naming_the_field(path):
    with pytest.raises(RunInvalid) as err:
        parse_run(yaml.safe_load(path.read_text()), str(path))
    assert header(path, "expect") in str(err.value)
    assert str(path) in str(err.value)
    assert rule(path) in " ".join(str(err.value).split()), "alignctl's refusal lacks the rule's words"


def test_validate_cli_reports_every_bad_file_and_fails(capsys):
    good, bad = ROOT / "examples" / "tiny-run.yaml", ROOT / "tests/manifests/bad/weight-above-one.yaml"
    assert alignctl(["validate", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "ok  " in out and "tiny" in out
    assert "spec.stages[0].datasets[0].weight" in err
    assert "1.5" in err, "the bad value is shown"
    assert "less than or equal to 1" in err, "what is accepted is shown"


def test_errors_name_the_bad_value_and_what_is_accepted():
    doc = yaml.safe_load((ROOT / "tests/manifests/bad/from-unknown-stage.yaml").read_text())
    with pytest.raises(RunInvalid) as err:
        parse_run(doc)
    assert "'dpoo': stages[].from must name an earlier stage; accepted: sft, dpo" in str(err.value)
    doc = yaml.safe_load((ROOT / "tests/manifests/bad/unknown-strategy.yaml").read_text())
    with pytest.raises(RunInvalid) as err:
        parse_run(doc)
    msg = str(err.value)
    assert "'megatron'" in msg and "deepspeed-zero3" in msg


def test_validate_cli_on_unreadable_and_empty_files(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert alignctl(["validate", str(empty), str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "empty.yaml: invalid AlignmentRun:" in err and "no AlignmentRun document" in err
    assert "missing.yaml" in err and "cannot read" in err


def test_defaults_are_alignment_handbooks():
    run = parse_run({
        "apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "m"},
        "spec": {"model": {"source": "m"}, "stages": [
            {"name": "sft", "method": "sft", "datasets": [{"source": "d"}]}]},
    })
    t = run.spec.stages[0].training
    assert (t.lr_scheduler_type, t.warmup_ratio, t.seed, t.num_train_epochs, t.gradient_checkpointing) == (
        "cosine", 0.1, 42, 1.0, True)
    assert run.spec.stages[0].distributed == "deepspeed-zero3"
    assert run.spec.stages[0].datasets[0].weight == 1.0 and run.spec.stages[0].datasets[0].split == "train"
    assert run.spec.storage.volume_claim_template is not None, "a run without storage gets a claim template"


def test_wire_round_trip_keeps_camel_case_and_from():
    run = parse_run(yaml.safe_load((ROOT / "examples" / "zephyr-run.yaml").read_text()))
    wire = run.spec.wire()
    assert wire["stages"][2]["from"] == "dpo"
    assert wire["stages"][1]["training"]["maxPromptLength"] == 512
    again = AlignmentRun.model_validate({**run.model_dump(by_alias=True, exclude_none=True)})
    assert again.spec == run.spec


def test_pure_layers_import_no_kubernetes_kopf_or_torch():
    """api/, render/, reconcile.py and the recipe are plain functions over plain data (DESIGN.md)."""
    code = (
        "import sys, alignment_operator.api, alignment_operator.crd, alignment_trainer.recipe\n"
        "import alignment_operator.render.manifests, alignment_operator.render.recipe, alignment_operator.reconcile\n"
        "bad = [m for m in ('kopf', 'kubernetes', 'torch', 'transformers', 'trl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
