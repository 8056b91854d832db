"""The PNG that ``runs compare`` writes: the training loss, validation loss and monitored metric
of every run, overlaid; a file that ``runs compare`` did not write is never replaced.

Self-check: ``python -m core.report`` (writes the PNG of two runs and checks its mark).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.report.rows import RunRow, is_sweep
from core.run.logs import read_metrics
from core.run.outputs import guard_file
from core.run.storage import storage_errors

PNG_MARK = "core.report runs compare"
"""PNG ``Software`` text of the plots ``runs compare`` writes (only those are ever replaced)."""


def _ours(path: Path) -> bool:
    """Whether the PNG at ``path`` was written by ``runs compare``."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.info.get("Software") == PNG_MARK
    except Exception:  # noqa: BLE001 - not a readable PNG: certainly not ours
        return False


def plot_compare(
    rows: Sequence[RunRow], out: Path, title: str = "", overwrite: bool = False
) -> Path | None:
    """Overlay the runs' training loss, validation loss and monitored metric over steps.

    Args:
        rows: the runs (one colour each, the same in every panel).
        out: the PNG to write.
        title: figure title.
        overwrite: replace ``out`` even if ``runs compare`` did not write it (``--overwrite``).

    Returns:
        ``out``, or None when no run has logged anything yet.

    Raises:
        UserError: ``out`` exists and was not written by ``runs compare`` (without
            ``overwrite``), or is a file the runs are read from; ``out`` does not end in .png.
    """
    _check_out(rows, out, overwrite)
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    series = _curves(rows)
    if not series:
        return None
    fig = _draw(plt, rows, series, title)
    # Into a temporary file beside it, then renamed: a full disk leaves the old plot or none,
    # never half a PNG.
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with storage_errors("the comparison plot", out):
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=110, format="png", metadata={"Software": PNG_MARK})
            os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _check_out(rows: Sequence[RunRow], out: Path, overwrite: bool) -> None:
    """Refuse a PNG path that is not ours to write (see :func:`plot_compare`).

    Raises:
        UserError: ``out`` is another file, one the runs are read from, or not a ``.png``.
    """
    # core.run.outputs' guard: never over a file the toolkit did not write; its own plot it may
    # replace (the PNG carries PNG_MARK), so running the same comparison again just works.
    inputs = [(r.path / name, "a run") for r in rows for name in ("metrics.jsonl", "summary.json")]
    guard_file(out, "--png", inputs, overwrite=overwrite or (out.is_file() and _ours(out)))
    if out.suffix.lower() != ".png":
        raise UserError(
            f"--png {out}: the plot is a PNG image, so its name must end in .png (e.g. "
            f"--png {out.with_suffix('.png')}); nothing was written."
        )


def _curves(rows: Sequence[RunRow]) -> dict[str, list[tuple[RunRow, list[int], list[float]]]]:
    """The logged curves of each panel: training loss, validation loss and the monitored metric
    most runs share.

    Returns:
        ``{panel: [(row, steps, values), ...]}`` in panel order, only panels with a curve.
    """
    metrics = [r.metric for r in rows if r.metric]
    monitor = max(set(metrics), key=metrics.count) if metrics else None
    panels = ["train/loss", "val/loss"] + ([monitor] if monitor and monitor != "val/loss" else [])
    series: dict[str, list[tuple[RunRow, list[int], list[float]]]] = {p: [] for p in panels}
    for row in rows:
        records = read_metrics(row.path / "metrics.jsonl")
        for panel in panels:
            points = [
                (r["step"], r[panel]) for r in records if isinstance(r.get(panel), (int, float))
            ]
            if points:
                series[panel].append((row, [s for s, _ in points], [v for _, v in points]))
    return {p: series[p] for p in panels if series[p]}


def _draw(
    plt: Any,
    rows: Sequence[RunRow],
    series: dict[str, list[tuple[RunRow, list[int], list[float]]]],
    title: str,
) -> Any:
    """One figure, a panel per entry of ``series`` stacked over a shared step axis, one colour
    per run in every panel.

    Returns:
        The matplotlib figure (closed by the caller).
    """
    panels = list(series)
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    colour = {id(r): colours(i % colours.N) for i, r in enumerate(rows)}
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        for row, xs, ys in series[panel]:
            marker = "o" if len(xs) < 30 else None
            ax.plot(
                xs, ys, marker=marker, markersize=3, color=colour[id(row)], label=row.label[:48]
            )
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize=7, ncol=1 if len(rows) <= 8 else 2)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def default_png(paths: Sequence[Path], rows: Sequence[RunRow]) -> Path:
    """Where ``runs compare`` puts its PNG: ``<sweep>/compare.png`` for one sweep, else
    ``compare_<numbers>.png`` next to the first run."""
    if len(paths) == 1 and is_sweep(Path(paths[0])):
        return Path(paths[0]) / "compare.png"
    numbers = [r.number or r.path.name for r in rows[:6]] + (["etc"] if len(rows) > 6 else [])
    return Path(paths[0]).parent / f"compare_{'_'.join(numbers)}.png"
