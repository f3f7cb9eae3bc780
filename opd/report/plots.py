"""Learning curves: one plot per metric, and small multiples with the reference arm in each panel."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opd.report.runs import Group, Run, display_value, warn

# ---------------------------------------------------------------------------------------------- curves and plots


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start); ``window`` <= 1 leaves ``values`` as they are."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def group_curve(runs: Sequence[Run], metric: str, smooth: int = 1) -> tuple[np.ndarray, ...] | None:
    """(steps, mean, low, high) of ``metric`` over ``runs`` on the union of their steps; None when no run logged it.

    Each run is (optionally smoothed and) linearly interpolated onto the union of steps inside its own
    step range only; mean, min and max are taken over the runs present at each step.
    """
    series = [sorted(run.metrics[metric].items()) for run in runs if run.metrics.get(metric)]
    if not series:
        return None
    steps = np.array(sorted({step for s in series for step, _ in s}), dtype=float)
    grid = np.full((len(series), len(steps)), np.nan)
    for row, points in zip(grid, series):
        x, y = np.array(points, dtype=float).T
        inside = (steps >= x[0]) & (steps <= x[-1])
        row[inside] = np.interp(steps[inside], x, moving_average(y, smooth))
    return steps, np.nanmean(grid, axis=0), np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)


# 20 colours told apart on screen and in colour print: tab10 (grey swapped for black, grey marks the SFT
# reference) then 10 more chosen greedily for the largest CIELAB distance to those before (min. distance 27.7).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#000000", "#bcbd22", "#17becf",
           "#f032e6", "#00008b", "#556b2f", "#ffa07a", "#800000", "#1b9e77", "#a6761d", "#2f4f4f", "#8b008b", "#ffb000")
# 4 dash patterns x 7 markers: the (line style, marker) pair repeats only after 28 series, so lines differ in greyscale.
LINESTYLES = ("solid", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
REFERENCE_COLOR = "0.55"  # the SFT reference line in the small multiples


def series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``name -> {color, linestyle, marker}``, assigned in sorted order of the distinct ``names``.

    Colours are distinct for up to 20 series, (colour, line style, marker) for up to 140; the same set
    of names always gets the same styles, whatever order the groups come in.
    """
    ordered = sorted(set(names))
    return {name: {"color": PALETTE[i % len(PALETTE)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                   "marker": MARKERS[i % len(MARKERS)]} for i, name in enumerate(ordered)}


def _draw(ax: Any, curve: tuple[np.ndarray, ...], scale: float, style: dict[str, Any], label: str | None,
          band_alpha: float = 0.2) -> None:
    """One mean line with markers (at most ~12 per line) and its min..max band."""
    steps, mean, low, high = (curve[0], *(scale * c for c in curve[1:]))
    ax.plot(steps, mean, markersize=4, markevery=max(1, len(steps) // 12), linewidth=1.6, label=label, **style)
    ax.fill_between(steps, low, high, color=style["color"], alpha=band_alpha, linewidth=0)


def _metric_axes_labels(ax: Any, metric: str, scale: float, xlabel: bool = True, ylabel: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    if xlabel:
        ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(f"{metric} (%)" if scale != 1.0 else metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _metric_curves(groups: Sequence[Group], metric: str, smooth: int) -> tuple[float, list[tuple[Group, tuple]]]:
    """(display scale: 100 for accuracies, else 1; ``(group, curve)`` for every group that logged ``metric``)."""
    scale = 100.0 if "accuracy" in metric else 1.0
    return scale, [(group, curve) for group in groups if (curve := group_curve(group.runs, metric, smooth)) is not None]


def plot_metric(groups: Sequence[Group], metric: str, path: Path, smooth: int = 1) -> bool:
    """Write a PNG of ``metric`` vs step, one line (mean) and band (min..max) per group; False if nothing logged it.

    Every group has its own colour, line style and marker (``series_styles``); the legend sits outside the axes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, curves = _metric_curves(groups, metric, smooth)
    if not curves:
        return False
    styles = series_styles([group.label for group in groups])
    fig = Figure(figsize=(7.5 + (2.5 if len(curves) > 1 else 0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for group, curve in curves:
        _draw(ax, curve, scale, styles[group.label], f"{group.label} (n={len(group.runs)})",
              band_alpha=0.2 if len(curves) <= 4 else 0.08)
    smoothing = f", moving average over {smooth} steps" if smooth > 1 else ""
    ax.set_title(f"{metric}: mean over seeds (band: min–max{smoothing})")
    _metric_axes_labels(ax, metric, scale)
    ax.legend(fontsize="small", handlelength=3.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=120)
    return True


def reference_group(groups: Sequence[Group]) -> Group | None:
    """The SFT baseline: the first group whose label contains ``sft`` (any case); None when there is none."""
    return next((group for group in groups if "sft" in group.label.lower()), None)


def _panel_title(group: Group) -> str:
    """The group's value when it is grouped by one key (``gkd``), else its full label wrapped to the panel's width."""
    if len(group.values) == 1:
        return display_value(next(iter(group.values.values())))
    return "\n".join(textwrap.wrap(group.label, width=32))


def small_multiples_figure(groups: Sequence[Group], metric: str, smooth: int = 1) -> Any:
    """A matplotlib Figure with one panel per group that logged ``metric`` (shared axes), None when none did.

    Each panel draws its group in its ``series_styles`` style; every other panel also draws the SFT group
    (``reference_group``) as a grey dashed reference line labelled ``reference``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, curves = _metric_curves(groups, metric, smooth)
    if not curves:
        return None
    styles = series_styles([group.label for group in groups])
    reference = reference_group([group for group, _ in curves])
    ref_curve = next((curve for group, curve in curves if group is reference), None)
    ncols = min(4, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = Figure(figsize=(2.9 * ncols + 0.6, 2.3 * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for i, (ax, (group, curve)) in enumerate(zip(axes, curves)):
        if ref_curve is not None and group is not reference:
            ax.plot(ref_curve[0], scale * ref_curve[1], color=REFERENCE_COLOR, linestyle=(0, (4, 2)), linewidth=1.4,
                    label="reference", zorder=1)
        _draw(ax, curve, scale, styles[group.label], group.label)
        ax.set_title(f"{_panel_title(group)} (n={len(group.runs)})", fontsize="medium")
        bottom = i >= len(curves) - ncols  # nothing below it: show its step ticks and label
        _metric_axes_labels(ax, metric, scale, xlabel=bottom, ylabel=i % ncols == 0)
        ax.xaxis.set_tick_params(labelbottom=bottom)
    for ax in axes[len(curves):]:
        ax.remove()
    smoothing = f", moving average over {smooth} steps" if smooth > 1 else ""
    ref_text = f"; grey dashed: {reference.label}" if ref_curve is not None else ""
    fig.suptitle(f"{metric}: mean over seeds (band: min–max{smoothing}){ref_text}")
    return fig


def plot_small_multiples(groups: Sequence[Group], metric: str, path: Path, smooth: int = 1) -> bool:
    """Write ``small_multiples_figure`` as a PNG; False when no group logged ``metric``."""
    fig = small_multiples_figure(groups, metric, smooth)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    return True


def write_plots(groups: Sequence[Group], metrics: Sequence[str], smooth: int, out_dir: Path) -> list[Path]:
    """The PNGs that could be drawn: each of ``metrics`` as logged, then ``train/loss`` smoothed; warnings for the rest."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("matplotlib is not installed (pip install 'opd[report]'); no plots")
        return []
    wanted = [(metric, 1) for metric in dict.fromkeys(metrics) if metric != "train/loss"] + [("train/loss", smooth)]
    written = []
    for metric, window in wanted:
        path = out_dir / f"{metric.replace('/', '_')}.png"
        if plot_metric(groups, metric, path, window):
            written.append(path)
        else:
            warn(f"no run logged {metric!r}; no {path.name}")
            continue
        panels = path.with_name(f"{path.stem}_small_multiples.png")
        if metric != "train/loss" and len(groups) > 1 and plot_small_multiples(groups, metric, panels, window):
            written.append(panels)
    return written


