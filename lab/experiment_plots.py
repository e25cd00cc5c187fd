"""The PNG plots of ``zps experiment`` (matplotlib, Agg): accuracy against wall time and against cumulative wire
bytes, one colour per configuration, one line per seed (the legend names each configuration once)."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from .experiment_summary import Curve


def plot_curves(groups: Sequence[tuple[str, Sequence[Curve]]], out_dir: Path, title: str = "") -> list[Path]:
    """Write ``<metric>_vs_time.png`` and ``<metric>_vs_bytes.png`` into ``out_dir``; the files written (none
    when no curve has a point). ``groups``: (label, its runs' curves), one per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for _, cs in groups for c in cs if c.values]
    if not curves:
        return []
    metric = curves[0].metric
    written = []
    labels = [textwrap.fill(label, 110, subsequent_indent="    ") for label, _ in groups]
    lines = sum(label.count("\n") + 1 for label in labels)
    for axis, xlabel in (("time", "wall time since the first step (s)"), ("bytes", "cumulative wire bytes (MB)")):
        # the legend goes under the plot, where it hides no line however long the configurations' names are
        fig, ax = plt.subplots(figsize=(9, 5 + 0.2 * lines), layout="constrained")
        colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
        for i, ((_, cs), label) in enumerate(zip(groups, labels, strict=True)):
            shown = False
            for c in cs:
                if not c.values:
                    continue
                xs = c.seconds if axis == "time" else [b / 1e6 for b in c.wire_bytes]
                ax.plot(xs, c.values, color=colours(i % colours.N), alpha=0.85, linewidth=1.4,
                        marker="." if len(xs) < 30 else None, label=None if shown else label)
                shown = True
        if axis == "bytes" and all(b > 0 for c in curves for b in c.wire_bytes):
            ax.set_xscale("log")  # compressed and plain runs differ by orders of magnitude
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title)
        fig.legend(fontsize="small", loc="outside lower center")
        path = out_dir / f"{metric}_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
