"""``curves.png``: training / validation loss and every validation metric over optimizer steps.

Self-check: ``python -m core.run.plots``.
"""

from __future__ import annotations

from pathlib import Path

from core.run.logs import read_metrics


def plot_curves(metrics_file: Path, out: Path, title: str = "") -> Path | None:
    """Draw the loss curves and validation metrics of a run.

    Args:
        metrics_file: the run's ``metrics.jsonl``.
        out: PNG to write.
        title: figure title (e.g. the run folder name).

    Returns:
        ``out``, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            if key.endswith("loss") or key.startswith("val/"):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(record["step"])
                ys.append(float(value))
    if not series:
        return None
    losses = sorted(k for k in series if k.endswith("loss"))
    others = sorted(k for k in series if k not in losses)
    panels = ([losses] if losses else []) + [[k] for k in others]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False
    )
    for ax, keys in zip(axes[:, 0], panels):
        for key in keys:
            xs, ys = series[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_ylabel(keys[0] if len(keys) == 1 else "loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":  # self-check: python -m core.run.plots
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        rows = [{"step": s, "train/loss": 3.0 / s} for s in range(1, 11)] + [
            {"step": 10, "val/loss": 0.4, "val/rougeL": 0.2}
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        png = plot_curves(path, Path(tmp) / "curves.png", "self-check")
        assert png is not None and png.stat().st_size > 1000
        print("wrote", png.stat().st_size, "bytes")
    print("core.run.plots: ok")
