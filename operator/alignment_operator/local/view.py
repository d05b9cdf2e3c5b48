"""What `alignctl run --local` shows a person: progress bars, failures, the final table.

The trainer prints one JSON line per event on stdout (alignment_trainer.results.emit);
everything here reads those and the status, and only prints.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from alignment_trainer.recipe import METHODS

from .. import progress

# Progress-line metrics and their short names, in display order.
SHOWN = [("loss", "loss"), ("eval_loss", "eval_loss"), ("rewards/accuracies", "acc"),
         ("rewards/margins", "margin"), ("eval_rewards/accuracies", "eval_acc")]
# Metrics of the final table per method family.
KEY_METRICS = {
    "sft": ["train_loss", "eval_loss"],
    "pref": ["train_loss", "eval_loss", "eval_rewards/accuracies", "rewards/accuracies",
             "eval_rewards/margins", "rewards/margins"],
    "data": ["prompts", "completions", "mean_reward", "pairs", "desirable", "undesirable", "generation_stop_rate"],
    "eval": ["mean_reward", "reference_mean_reward", "preference_accuracy", "reward_margin", "logp_accuracy", "reference_logp_accuracy",
             "perplexity", "reference_perplexity", "generation_stop_rate", "judge_win_rate"],
}


def parse_event(line: str) -> dict | None:
    """The trainer's JSON event in a line of output, also when another process's progress bar
    (tqdm writes \r, not \n) got in front of it on the shared pipe."""
    start = line.find('{"event"')
    text = line[start:].strip() if start >= 0 else ""
    if not text.endswith("}"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def rel(path: str | Path | None) -> str:
    """A path as short as it can be said from the current directory."""
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def clip(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def duration(seconds: float | None) -> str:
    """kubectl's AGE style: 45s, 3m12s, 42m, 5h3m, 2d."""
    if seconds is None:
        return "?"
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 3600}h" if s < 48 * 3600 else f"{s // 86400}d"


def _since(start: str | None, end: str | None = None) -> float | None:
    if not start:
        return None
    t0 = datetime.fromisoformat(start.replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else datetime.now(t0.tzinfo)
    return (t1 - t0).total_seconds()


class ProgressBar:
    """One line per stage (redrawn on a terminal; otherwise printed every ~10% of training and
    at the end of each evaluation task)."""

    def __init__(self, label: str, tty: bool | None = None):
        # tty False: lines, never a redrawn bar (stages side by side share the terminal)
        self.label, self.tty = label, sys.stdout.isatty() if tty is None else tty and sys.stdout.isatty()
        self.last: dict = {}
        self.live = None
        self.task, self.t0, self.shown_step, self.shown_at, self.drawn = None, 0.0, -1, 0.0, False

    def event(self, ev: dict | None, live=None) -> None:
        """A trainer event; `live` the stage's status progress (api.StageProgress) it made, whose
        ETA and tokens/s the bar shows, as status.json and `kubectl get` do."""
        if ev is None:
            return
        self.live = live
        kind = ev.get("event")
        if kind == "start" and ev.get("resume_from"):
            self._print(f"  resuming from {rel(ev['resume_from'])}")
        elif kind == "skipped":
            self._print(f"  skipped: {ev.get('reason', '')}")
        elif kind == "progress" and isinstance(ev.get("step"), int) and ev.get("total"):
            self._progress(ev)

    def _progress(self, ev: dict) -> None:
        step, total, task = ev["step"], ev["total"], ev.get("task")
        if task != self.task or not self.t0:
            self.close()
            self.task, self.t0, self.shown_step = task, time.time(), -1
            self.shown_at = self.t0 if task else 0.0  # evaluation tasks: one line when done
        self.last = ev
        # The trainer's pace (alignment_trainer.pace), training and evaluation tasks alike: shown, not estimated
        seconds = ev.get("step_seconds")
        rate = 1 / seconds if isinstance(seconds, (int, float)) and seconds > 0 else None
        eta = f"  left {progress.eta_text(ev['eta_seconds'])}" if isinstance(ev.get("eta_seconds"), int) else ""
        live = self.live if not task else None
        if live is not None and live.eta_seconds is not None and step < total:
            eta = f"  {live.percent}% ETA {progress.eta_text(live.eta_seconds)}"
        if live is not None and live.tokens_per_second:
            eta += f"  {live.tokens_per_second:.0f} tok/s"
        metrics = [f"{short} {ev[k]:.4g}" for k, short in SHOWN if isinstance(ev.get(k), (int, float))]
        label = f"{self.label}{f' {task}' if task else ''}"
        rate_text = f"{rate:.2f} it/s" if rate else ""
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            line = fit_line(label, step, total, eta.strip(), rate_text, metrics, width)
            sys.stdout.write("\r" + line.ljust(width))
            sys.stdout.flush()
            self.drawn = True
            return
        if step == self.shown_step and not metrics:
            return  # the trainer's end-of-training summary row: nothing new to show
        line = fit_line(label, step, total, eta.strip(), rate_text, metrics, None)
        if step == total or (not task and step - self.shown_step >= total / 10) or time.time() - self.shown_at > 30:
            print(line, flush=True)
            self.shown_step, self.shown_at = step, time.time()

    def _print(self, text: str) -> None:
        self.close()
        print(text, flush=True)

    def close(self) -> None:
        if self.drawn:
            sys.stdout.write("\n")
            self.drawn = False


def fit_line(label: str, step: int, total: int, eta: str, rate: str, metrics: list[str], width: int | None) -> str:
    """One progress line, `width` columns at most (None: whole). What goes first when it does not
    fit: the metrics (last ones first), the rate, half the bar, the bar; the stage, its step and the
    ETA stay (cut only on a terminal narrower than them)."""
    def line(bar: int, metrics: list[str], rate: str) -> str:
        filled = int(bar * min(step / total, 1))
        drawn = f" [{'#' * filled}{'.' * (bar - filled)}]" if bar else ""
        return "  ".join(p for p in [f"  {label:<12}{drawn} {step}/{total}", eta, *metrics, rate] if p)

    bar = 20
    text = line(bar, metrics, rate)
    while width is not None and len(text) > width:
        if metrics:
            metrics = metrics[:-1]
        elif rate:
            rate = ""
        elif bar:
            bar = 10 if bar == 20 else 0
        else:
            return text[:width]
        text = line(bar, metrics, rate)
    return text


def last_words(lines: list[str]) -> str:
    """When a stage died without writing its outcome (killed, segfault): its last line of output."""
    plain = [ln.rstrip() for ln in lines if ln.strip() and parse_event(ln) is None and not ln.startswith("=== ")]
    return clip(plain[-1], 2000) if plain else "no output"


def show_tail(lines: list[str], path: Path, n: int = 20) -> None:
    plain = [ln.rstrip() for ln in lines if parse_event(ln) is None]
    print(f"--- last {min(n, len(plain))} lines of {rel(path)} ---", file=sys.stderr)
    for ln in plain[-n:]:
        print(f"  {clip(ln, 400)}", file=sys.stderr)


def announce(run, run_dir: Path) -> None:
    from ..graph import describe

    print(f"run {run.metadata.name}: {describe(run)}; outputs in {rel(run_dir)}/")
    for st in (run.status.stages if run.status else []):
        if st.phase == "Succeeded":
            print(f"- stage {st.name} succeeded earlier ({rel(st.checkpoint)}): skipped")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def compared_rows(status: dict, sort: str | None = None) -> list[dict]:
    """status.comparison's rows, sorted best first by `sort` when given (lower is better for losses,
    perplexity and seconds), the best marked; as status has them otherwise."""
    rows = [dict(r) for r in status.get("comparison") or []]
    if sort and rows:
        lower = any(w in sort for w in ("loss", "perplexity", "ppl", "seconds"))
        rows.sort(key=lambda r: (sort not in r.get("metrics", {}),
                                 (1 if lower else -1) * r.get("metrics", {}).get(sort, 0.0)))
        for r in rows:
            r["best"] = False
        if sort in rows[0].get("metrics", {}):
            rows[0]["best"] = True
    return rows


COMPARED = ("preference_accuracy", "reward_margin", "eval_loss", "perplexity", "logp_accuracy", "mean_reward")


def compare_table(status: dict, sort: str | None = None) -> str:
    """status.comparison (status as on the wire) as a table: one row per evaluated stage, its matrix values,
    the metric it is sorted by first, then the usual eval metrics, its GPU-hours (cpu: a CPU-only stage);
    sorted best first by `sort` (default: the eval's compareBy, as status holds it), the best marked *, and the
    one spec.promote promoted (a gate or promote.chooseBy may pick another) in a PROMOTE column."""
    rows = compared_rows(status, sort)
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in (r.get("matrix") or {})))
    shown = [m for m in dict.fromkeys([*([sort] if sort else []), *COMPARED])
             if any(m in r.get("metrics", {}) for r in rows)]
    promoted = any(r.get("promoted") for r in rows)
    table = [["", "STAGE", *keys, *shown, "GPU-H", *(["PROMOTE"] if promoted else [])]]
    for r in rows:
        gpu = "cpu" if r.get("gpus") == 0 else f"{r.get('gpuSeconds', 0.0) / 3600:.2f}"
        table.append(["*" if r.get("best") else "", r["stage"], *(str((r.get("matrix") or {}).get(k, "")) for k in keys),
                      *(_fmt(r["metrics"][m]) if m in r.get("metrics", {}) else "-" for m in shown), gpu,
                      *((["promoted" if r.get("promoted") else ""]) if promoted else [])])
    return _table(table)


def summary(run, status, run_dir: Path, curves: Path | None) -> None:
    """`kubectl get alignmentruns`, then each stage's key metrics, then where the files are."""
    print()
    print(_table([["NAME", "PHASE", "STAGE", "PROGRESS", "MODEL", "AGE"],
                  [run.metadata.name, status.phase, status.current_stage or "", status.progress or "",
                   rel(status.model), duration(_since(status.start_time))]]))
    print()
    rows = [["STAGE", "METHOD", "PHASE", "TIME", "METRICS"]]
    for spec, st in zip(run.spec.stages, status.stages):
        info = METHODS[spec.method]
        family = "data" if info.writes else "eval" if not info.trains else "pref" if info.preference else "sft"
        shown = [f"{k}={_fmt(st.metrics[k])}" for k in KEY_METRICS[family] if k in st.metrics]
        took = duration(_since(st.start_time, st.completion_time)) if st.start_time else ""
        said = "(below)" if st.phase == "Failed" else (st.message or "")[:100]
        rows.append([st.name, spec.method, st.phase, took, "  ".join(shown) or said])
    print(_table(rows))
    compared = compare_table(status.wire())
    if compared:
        print(f"\ncomparison (best first, * best; `alignctl compare` sorts by another metric):\n{compared}")
    ev = status.evaluation
    if "logp_accuracy" in ev and "reference_logp_accuracy" in ev:
        result = run_dir / str(ev.get("stage", "")) / "result.json"
        models = json.loads(result.read_text()) if result.is_file() else {}
        print(f"\nheld-out pairs: {rel(models.get('checkpoint')) or 'the model'} prefers chosen over rejected in "
              f"{ev['logp_accuracy']:.0%} of them, {rel(models.get('reference_model')) or 'its reference'} in "
              f"{ev['reference_logp_accuracy']:.0%} (implicit-reward accuracy "
              f"{ev.get('preference_accuracy', float('nan')):.0%})")
        if models.get("generations"):
            print(f"generations: {rel(models['generations'])}")
    if status.promotion is not None:
        print("\n" + promotion_table(status.promotion) + "\n")
    if curves:
        print(f"curves: {rel(curves)}")
    print(f"status: {rel(run_dir / 'status.json')}")
    for c in status.conditions:
        if c.type == "SpecRejected" and c.status == "True":
            print(f"\nnote: {c.message}", file=sys.stderr)
    failed = next((s for s in status.stages if s.phase == "Failed"), None)
    if failed:
        log = run_dir / failed.name / "log.txt"
        print(f"\nstage {failed.name} failed: {failed.message}"
              + (f"\n  its output: {rel(log)}" if log.is_file() else ""), file=sys.stderr)


def promotion_table(p) -> str:
    """spec.promote's decision: the verdict, then one row per gate (value, rule, threshold, verdict)."""
    head = f"PROMOTION: {p.verdict} {p.stage or ''}" + (
        f" ({', '.join(f'{k} {v}' for k, v in p.matrix.items())})" if p.matrix else "") + (
        f" ({rel(p.model)})" if p.model else "")
    if p.candidates > 1:
        head += f", best of {p.candidates} by {p.chosen_by}"
    rows = [["GATE", "STAGE", "VALUE", "RULE", "THRESHOLD", "VERDICT"]]
    for g in p.gates:
        rows.append([g.metric, g.stage, "missing" if g.value is None else _fmt(g.value), g.rule,
                     "missing" if g.threshold is None else _fmt(g.threshold), "passed" if g.passed else "FAILED"])
    lines = [f"export {e.uri}: " + (f"{e.digest}, {e.bytes} bytes, {e.files} files, {e.seconds} s" if not e.error
                                    else f"FAILED: {e.error}") for e in p.exports]
    return "\n".join([head + ("\n" + _table(rows) if p.gates else ""), *lines])
