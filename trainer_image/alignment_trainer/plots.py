"""Training curves of a whole run as one PNG: loss, reward margins, preference accuracies.

    plot_run_curves("runs/default/tiny", "runs/default/tiny/curves.png")
    python -m alignment_trainer.plots RUN_DIR OUT.png [STAGE ...]     # what `alignctl run --local` runs
    python -m alignment_trainer.plots --compare STATUS.json OUT.png [METRIC ...]   # a sweep's comparison

Reads each stage's metrics.jsonl (one JSON row per logging step, see results.py) and draws
the stages one after the other on a shared step axis, a dashed line where a stage starts;
held-out (eval_*) values are drawn as markers. matplotlib with the Agg backend: no display.
"""

from __future__ import annotations

import json
from pathlib import Path

# (panel title, metric key); a panel appears only when some stage logged its metric.
PANELS = [
    ("loss", "loss"),
    ("reward margin (chosen - rejected)", "rewards/margins"),
    ("preference accuracy", "rewards/accuracies"),
    ("learning rate", "learning_rate"),
]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, as the stage's final history: when an attempt resumed from a
    checkpoint (its steps go back), the rows the stopped attempt logged from that step on are
    dropped, so the curve shows what the model that was kept went through."""
    rows: list[dict] = []
    trained_to = -1  # the last step a training ("loss") row was logged for
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        step = row.get("step")
        # A training row at or before a step already trained through: a resumed attempt, which
        # replaces those rows (rows of one step without "loss", such as eval and summaries, stay).
        if "loss" in row and isinstance(step, int):
            if step <= trained_to:
                rows = [r for r in rows if r.get("step", 0) < step]
            trained_to = step
        rows.append(row)
    return rows


def stage_metrics(run_dir: str | Path, stages: list[str] | None = None,
                  exclude: list[str] = ()) -> list[tuple[str, list[dict]]]:
    """(stage, rows) for the stages of a run directory with a metrics.jsonl.

    stages: their names in order (the run's spec); default: every subdirectory, ordered by
    when each stage logged first.
    """
    run_dir = Path(run_dir)
    names = stages if stages is not None else [p.name for p in sorted(run_dir.iterdir()) if p.is_dir()]
    found = [(n, read_metrics(run_dir / n / "metrics.jsonl")) for n in names
             if n not in exclude and (run_dir / n / "metrics.jsonl").is_file()]
    found = [(n, rows) for n, rows in found if rows]
    if stages is None:
        found.sort(key=lambda item: item[1][0].get("time", 0))
    return found


def plot_run_curves(run_dir: str | Path, out: str | Path, stages: list[str] | None = None,
                    exclude: list[str] = ()) -> Path | None:
    """Write the curves PNG; None (and no file) when no stage logged anything."""
    found = stage_metrics(run_dir, stages, exclude)
    if not found:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, key) for title, key in PANELS
              if any(key in r or f"eval_{key}" in r for _, rows in found for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offset = 0
    for n, (stage, rows) in enumerate(found):
        color = colors[n % len(colors)]
        last = max((r.get("total") or r.get("step", 0) for r in rows), default=0)
        for ax, (_, key) in zip(axes[:, 0], panels):
            train = [(offset + r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            held = [(offset + r["step"], r[f"eval_{key}"]) for r in rows
                    if isinstance(r.get(f"eval_{key}"), (int, float))]
            if train:
                ax.plot(*zip(*train), color=color, label=f"{stage}")
            if held:
                ax.plot(*zip(*held), color=color, marker="o", linestyle="--", label=f"{stage} (held-out)")
            if n:
                ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
        offset += last
    for ax, (title, key) in zip(axes[:, 0], panels):
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("optimizer step (stages one after the other)")
    fig.suptitle(f"training curves: {Path(run_dir).name}", fontsize=11)
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_comparison(rows: list[dict], out: str | Path, metrics: list[str], title: str = "") -> Path | None:
    """An eval of several stages side by side: one panel per metric, one bar per evaluated stage (its
    matrix values in its label), in the rows' order (best first), the best bar outlined. `rows`: a run
    status's comparison ({stage, matrix, metrics, best}). None (and no file) when no row has a metric."""
    metrics = [m for m in dict.fromkeys(metrics) if any(m in r.get("metrics", {}) for r in rows)]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["stage"] + ("".join(f"\n{k}={v}" for k, v in (r.get("matrix") or {}).items())) for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.6 * len(rows) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [r.get("metrics", {}).get(metric, float("nan")) for r in rows]
        bars = ax.barh(range(len(rows)), values, color=["tab:green" if r.get("best") else "tab:blue" for r in rows])
        for bar, r in zip(bars, rows):
            if r.get("best"):
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()  # best (first) on top
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title or "comparison (best in green)", fontsize=11)
    return _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--compare"] and len(args) >= 3:  # --compare STATUS.json OUT.png [METRIC ...]
        rows = json.loads(Path(args[1]).read_text()).get("comparison") or []
        written = plot_comparison(rows, args[2], args[3:] or ["preference_accuracy", "reward_margin", "eval_loss"])
        print(written or "no comparison to plot")
        return 0
    if len(args) < 2:
        print("usage: python -m alignment_trainer.plots RUN_DIR OUT.png [STAGE ...]", file=sys.stderr)
        return 2
    written = plot_run_curves(args[0], args[1], stages=args[2:] or None)
    print(written or "no stage logged any metrics")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
