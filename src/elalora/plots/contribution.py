"""Figure of the layer-contribution study (``elalora analyze``): the drop in the task metric when
the adapters of the top-ranked, random or bottom-ranked matrices are switched off.

Input: the ``summary`` rows of :class:`elalora.recipe.analysis.Contribution` (plain dicts with
``fraction``, ``group``, ``k``, ``drop_mean``, ``drop_std``, ``draws``), so the figure can be redrawn
from the JSON the command writes.

Imports: :mod:`.figures` (the drawing helpers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .figures import pyplot, save_figure

__all__ = ["plot_layer_contribution"]

_GROUPS = (("top", "highest final rank", "#c0392b"), ("random", "random (mean ± std)", "#7f8c8d"),
           ("bottom", "lowest final rank", "#2980b9"))


def plot_layer_contribution(summary: Sequence[Mapping], path: str | os.PathLike, *, metric: str = "metric",
                            baseline: float | None = None, title: str | None = None) -> None:
    """Grouped bars: one group per fraction k of the matrices, one bar per selection."""
    if not summary:
        raise ValueError("plot_layer_contribution: no rows")
    plt = pyplot()
    fracs = sorted({float(r["fraction"]) for r in summary})
    fig, ax = plt.subplots(figsize=(1.2 + 2.0 * len(fracs), 3.6))
    width = 0.8 / len(_GROUPS)
    for gi, (group, label, colour) in enumerate(_GROUPS):
        xs, ys, es = [], [], []
        for fi, f in enumerate(fracs):
            row = next((r for r in summary if float(r["fraction"]) == f and r["group"] == group), None)
            if row is None:
                continue
            xs.append(fi + (gi - 1) * width)
            ys.append(float(row["drop_mean"]))
            es.append(float(row["drop_std"]) if group == "random" else 0.0)
        if xs:
            ax.bar(xs, ys, width, yerr=es if any(es) else None, label=label, color=colour, capsize=3)
    ks = {float(r["fraction"]): r["k"] for r in summary}
    ax.set_xticks(range(len(fracs)), [f"{f:.0%} (k = {ks[f]})" for f in fracs])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("adapters switched off")
    ax.set_ylabel(f"drop in {metric}")
    head = title or "Layer contribution"
    if baseline is not None:
        head += f"  ({metric} with all adapters: {baseline:.3f})"
    ax.set_title(head, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    save_figure(fig, path)
