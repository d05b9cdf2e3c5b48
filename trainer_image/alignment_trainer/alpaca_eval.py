"""AlpacaEval 2 (Dubois et al. 2024) through alpaca-eval itself: win rate, length-controlled win
rate and their standard errors against reference outputs, judged by eval.judge.

The model answers the instructions with its own chat template (batched, greedy); the answers are
written to model_outputs.json before anything is judged (a rerun of the same model reuses them).
An annotator config is written to <output_dir>/alpaca_eval/annotator/: AlpacaEval 2's default
(weighted_alpaca_eval_gpt4_turbo: its prompt, its logprob parser, max_tokens 1, top_logprobs 5)
with the judge's model name and endpoint, no API key in it; or the user's own config directory.
alpaca_eval.evaluate then annotates (random output order, its own cache beside the config) and
computes the metrics with get_length_controlled_winrate (its GLM reads tatsu-lab/alpaca_eval's
df_gamed.csv from the Hub cache: HF_HOME on the run's volume). The API key reaches the OpenAI client
only through this process's OPENAI_API_KEY, set from eval.judge.api_key_env for the call.

Files in <output_dir>/alpaca_eval/: model_outputs.json, reference_outputs.json, annotations.json
(every prompt sent and raw judge completion, alpaca-eval's own), leaderboard.csv, summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import yaml

from . import data
from .judge import Judge, JudgeError
from .recipe import AlpacaEvalArgs, JudgeArgs

log = logging.getLogger("alignment_trainer")
GENERATOR = "model"


def load_instructions(args: AlpacaEvalArgs) -> tuple[list[str], list[dict]]:
    """(instructions the model answers, reference rows {instruction, output, generator})."""
    where = data.describe(args.reference_outputs)
    refs, _ = data.read_rows(args.reference_outputs)
    bad = next((i for i, r in enumerate(refs) if not isinstance(r.get("instruction"), str)
                or not isinstance(r.get("output"), str)), None)
    if bad is not None:
        raise data.DataError(f"eval.alpaca_eval.reference_outputs: {where} row {bad + 1}: needs text columns "
                             f"instruction and output; has {sorted(refs[bad])}")
    refs = [{"instruction": r["instruction"], "output": r["output"], "generator": r.get("generator") or "reference"}
            for r in refs]
    if args.prompts is None:
        instructions = [r["instruction"] for r in refs]
    else:
        rows, _ = data.read_rows(args.prompts)
        instructions = [r.get("instruction") for r in rows]
        if not all(isinstance(i, str) and i for i in instructions):
            raise data.DataError(f"eval.alpaca_eval.prompts: {data.describe(args.prompts)}: every row needs a text "
                                 "column instruction")
        known = {r["instruction"] for r in refs}
        missing = [i for i in instructions if i not in known]
        if missing:
            raise data.DataError(f"eval.alpaca_eval.prompts: {len(missing)} instructions have no reference output "
                                 f"in {where}, e.g. {missing[0][:80]!r}")
    if args.max_instances:
        instructions = instructions[:args.max_instances]
    wanted = set(instructions)
    return instructions, [r for r in refs if r["instruction"] in wanted]


def answer(generate, instructions: list[str], folder: Path, model_path: str, max_new_tokens: int) -> list[dict]:
    """The model's outputs in alpaca-eval's format, cached in model_outputs.json for a rerun."""
    path = folder / "model_outputs.json"
    key = {"model": model_path, "max_new_tokens": max_new_tokens}
    if path.is_file():
        cached = json.loads(path.read_text())
        if [(c["instruction"], c.get("key")) for c in cached] == [(i, key) for i in instructions]:
            log.info("eval.alpaca_eval: reusing %d outputs in %s", len(cached), path)
            return cached
    answers = generate([[{"role": "user", "content": i}] for i in instructions], "alpaca_eval answers")
    outputs = [{"instruction": i, "output": a["text"], "generator": GENERATOR, "key": key}
               for i, a in zip(instructions, answers)]
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outputs, indent=1, ensure_ascii=False))
    return outputs


def write_annotator(judge: JudgeArgs, folder: Path) -> Path:
    """AlpacaEval 2's default annotator, pointed at the judge's model and endpoint (no key)."""
    import alpaca_eval

    base = Path(alpaca_eval.__file__).parent / "evaluators_configs"
    default = yaml.safe_load((base / "weighted_alpaca_eval_gpt4_turbo" / "configs.yaml").read_text())
    config = default["weighted_alpaca_eval_gpt4_turbo"]
    config["prompt_template"] = str(base / config["prompt_template"])  # relative to evaluators_configs/
    config["completions_kwargs"].update(
        model_name=judge.model, openai_api_base=judge.base_url.rstrip("/") + "/", num_procs=1,
        n_retries=judge.max_retries,
        client_kwargs={"timeout": judge.timeout_seconds, "max_retries": judge.max_retries - 1})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "configs.yaml"
    path.write_text(yaml.safe_dump({"judge": config}, sort_keys=False))
    return path


@contextmanager
def _openai_key(judge: JudgeArgs):
    """OPENAI_API_KEY for the OpenAI client alpaca-eval builds, only while it runs."""
    saved = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "OPENAI_API_KEYS")}
    os.environ["OPENAI_API_KEY"] = os.environ[judge.api_key_env]
    os.environ.pop("OPENAI_API_KEYS", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pkg_resources() -> None:
    """alpaca-eval 0.6.6 imports pkg_resources, which setuptools 81+ no longer ships; it uses only
    parse_version and get_distribution(...).version, which packaging and importlib.metadata give."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import sys
        import types

        from packaging.version import parse

        shim = types.ModuleType("pkg_resources")
        shim.parse_version = parse
        shim.get_distribution = lambda name: types.SimpleNamespace(version=version(name))
        sys.modules["pkg_resources"] = shim


def evaluate(args: AlpacaEvalArgs, judge: Judge, outputs: list[dict], references: list[dict],
             folder: Path) -> dict[str, float]:
    _pkg_resources()
    import alpaca_eval.constants as constants
    import alpaca_eval.main as ae

    config = Path(args.annotator_config) / "configs.yaml" if args.annotator_config else \
        write_annotator(judge.args, folder / "annotator")
    if not config.is_file():
        raise ValueError(f"eval.alpaca_eval.annotator_config: {config} not found (an alpaca-eval annotator config "
                         "directory holds configs.yaml)")
    (folder / "reference_outputs.json").write_text(json.dumps(references, indent=1, ensure_ascii=False))
    # Which model the endpoint says it is (alpaca-eval's annotations do not keep it), one short request.
    judge.complete("You are a helpful assistant.", "Reply with the single letter m.", max_tokens=1)
    constants.OPENAI_API_KEYS = None  # read at import; the client reads OPENAI_API_KEY itself
    model_outputs = [{k: o[k] for k in ("instruction", "output", "generator")} for o in outputs]
    with _openai_key(judge.args):
        try:
            leaderboard, annotations = ae.evaluate(
                model_outputs=model_outputs, reference_outputs=references, annotators_config=str(config),
                name=GENERATOR, output_path=str(folder), precomputed_leaderboard=None,
                is_return_instead_of_print=True, is_cache_leaderboard=False, max_instances=len(model_outputs),
                fn_metric="get_length_controlled_winrate",
                metric_kwargs={"glm_name": args.lc_glm, "save_weights_dir": str(folder / "glm_weights")})
        except Exception as e:  # noqa: BLE001 - the OpenAI client's errors, whatever their class
            raise JudgeError(f"eval.alpaca_eval: annotating with {judge.args.model} at {judge.args.base_url} failed: "
                             f"{type(e).__name__}: {judge._scrub(str(e))[:300]}; the model outputs are kept in "
                             f"{folder / 'model_outputs.json'} (reused when the stage runs again)") from None
    annotations = list(annotations or [])
    valid = [a for a in annotations if a.get("preference") is not None and not _nan(a["preference"])]
    if len(valid) < len(outputs):
        raise JudgeError(f"eval.alpaca_eval: judge {judge.args.model} gave a usable preference for {len(valid)} of "
                         f"{len(outputs)} instructions (alpaca-eval's parser found no m/M logprobs in the rest; see "
                         f"{folder / 'annotations.json'}); the model outputs are kept in {folder / 'model_outputs.json'}")
    row = leaderboard.loc[GENERATOR]
    return {"alpaca_eval/win_rate": float(row["win_rate"]),
            "alpaca_eval/standard_error": float(row["standard_error"]),
            "alpaca_eval/length_controlled_winrate": float(row["length_controlled_winrate"]),
            "alpaca_eval/lc_standard_error": float(row.get("lc_standard_error", math.nan)),
            "alpaca_eval/discrete_win_rate": float(row["discrete_win_rate"]),
            "alpaca_eval/n_total": int(row["n_total"]),
            "alpaca_eval/avg_length": float(row["avg_length"])}


def _nan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def versions() -> dict[str, str]:
    return {"alpaca_eval": version("alpaca_eval"), "openai": version("openai")}
