"""The PNG plots of ``zps experiment`` (matplotlib, Agg): accuracy (or loss) against wall time, against the wire bytes
of every worker (push and pull together) and against steps (sample efficiency, whatever the network). One colour
per configuration (and a line style: lines that coincide stay visible): a line for the mean over its seeds, a band
for the seeds' range (lowest to highest), the target as a grey dashed line; the legend, under the plot, names each
configuration and its number of seeds."""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .experiment_summary import Curve

GRID = 200  # points of a mean line
STYLES = ("-", "--", "-.", ":")  # line styles in turn: configurations whose lines coincide stay visible
# (file suffix, x label, the curve's x values)
AXES = (
    ("time", "wall time since the first step (s)"),
    ("bytes", "cumulative wire bytes of all workers, push + pull (MB, log scale)"),
    ("step", "steps done by the worker that evaluates (one step: a batch on every worker)"),
)


def _xs(c: Curve, axis: str) -> list[float]:
    if axis == "time":
        return c.seconds
    if axis == "bytes":
        return [b / 1e6 for b in c.wire_bytes]
    return c.steps


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Linear interpolation of (xs, ys) at x, xs ascending and x within them."""
    for i in range(1, len(xs)):
        if x <= xs[i]:
            span = xs[i] - xs[i - 1]
            return ys[i] if span <= 0 else ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / span
    return ys[-1]


def mean_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], log: bool = False) \
        -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, lowest, highest) of the curves (each (xs, ys), xs ascending) over the x range all of them cover,
    each interpolated linearly at :data:`GRID` points (log-spaced where ``log``). One curve: itself."""
    given = [(list(xs), list(ys)) for xs, ys in curves if len(xs)]
    if not given:
        return [], [], [], []
    if len(given) == 1:
        xs, ys = given[0]
        return xs, ys, ys, ys
    first, last = max(xs[0] for xs, _ in given), min(xs[-1] for xs, _ in given)
    if last <= first:
        grid = [first]
    elif log and first > 0:
        a, b = math.log(first), math.log(last)
        grid = [math.exp(a + (b - a) * i / (GRID - 1)) for i in range(GRID)]
    else:
        grid = [first + (last - first) * i / (GRID - 1) for i in range(GRID)]
    values = [[_interp(x, xs, ys) for xs, ys in given] for x in grid]
    return grid, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_curves(groups: Sequence[tuple[str, Sequence[Curve]]], out_dir: Path, title: str = "",
                target: float | None = None) -> list[Path]:
    """Write ``<metric>_vs_time.png``, ``<metric>_vs_bytes.png`` and ``<metric>_vs_step.png`` into ``out_dir``; the
    files written (none when no curve has a point). ``groups``: (label, its runs' curves), one per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for _, cs in groups for c in cs if c.values]
    if not curves:
        return []
    metric = curves[0].metric
    written = []
    labels = [textwrap.fill(f"{label} (n = {sum(bool(c.values) for c in cs)})", 110, subsequent_indent="    ")
              for label, cs in groups]
    lines = sum(label.count("\n") + 1 for label in labels)
    for axis, xlabel in AXES:
        log = axis == "bytes" and all(b > 0 for c in curves for b in c.wire_bytes)
        # the legend goes under the plot, where it hides no line however long the configurations' names are
        fig, ax = plt.subplots(figsize=(9, 5 + 0.2 * lines), layout="constrained")
        colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
        for i, ((_, cs), label) in enumerate(zip(groups, labels, strict=True)):
            x, mean, low, high = mean_band([(_xs(c, axis), c.values) for c in cs if c.values], log=log)
            if not x:
                continue
            colour = colours(i % colours.N)
            ax.plot(x, mean, color=colour, linewidth=1.6, label=label, linestyle=STYLES[i % len(STYLES)],
                    marker="." if len(x) < 30 else None)
            if low != high:
                ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
        if target is not None:
            ax.axhline(target, color="0.3", linestyle="--", linewidth=1.0, label=f"target {target:.3g}")
        if log:
            ax.set_xscale("log")  # compressed and plain runs differ by orders of magnitude
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (line: mean over seeds; band: their range)")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title)
        fig.legend(fontsize="small", loc="outside lower center")
        path = out_dir / f"{metric}_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
