"""Training curves of a whole run as one PNG: loss, reward margins, preference accuracies.

    plot_run_curves("runs/default/tiny", "runs/default/tiny/curves.png")

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
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
