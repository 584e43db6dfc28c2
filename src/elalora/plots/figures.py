"""Figures that show where the ranks went during adaptive-rank LoRA fine-tuning.

This is the only module of the package that plots.  Nothing is drawn or written unless one of
the ``plot_*`` functions (or :func:`write_all_figures`) is called with an output path; the PNG
files are written with matplotlib's non-interactive "Agg" backend and every figure is closed
after saving.  matplotlib is imported lazily, so the pure-data helpers of :mod:`.layout`
(and ``format_rank_table``, used by ``elalora inspect``) work without it.

Data formats (plain Python data, already parsed):

* rank pattern: ``dict[str, int]``, module name -> rank (Hugging Face module names);
* rank history events: ``list[dict]`` with keys ``step``, ``module``, ``old_rank``,
  ``new_rank`` and ``scores`` (the importance scores of that module's active ranks at that
  round, possibly empty), in step order; all events with the same step form one round;
* importance scores: ``dict[str, list[float]]``, module -> final per-rank scores;
* intrinsic dimensions (GeLoRA): ``list[float]`` d_0..d_L, one per hidden state.

matplotlib comes with ``pip install 'elalora[plots]'``.

Holds the shared drawing helpers, the rank heatmap and rank-over-time figures; :mod:`.scores`
holds the score and intrinsic-dimension figures, :mod:`.report` draws every figure of a run.

Imports: numpy, :mod:`.layout`, :mod:`elalora._extras` (matplotlib, lazily).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from .._extras import require
from .layout import (fmt_int, module_keys, unlayered, unlayered_note,
                     rank_matrix, rank_timeline,)

__all__ = ["plot_rank_heatmap", "plot_rank_over_time"]

DPI = 110
# Grids with more cells than this are drawn without per-cell numbers.
_ANNOTATE_MAX_CELLS = 150
# Legends with more entries than this are replaced by a colour bar.
_LEGEND_MAX_ENTRIES = 12


def pyplot():
    """pyplot on the Agg backend.

    The backend is only forced when pyplot has not been imported yet, so calling these
    functions from a notebook does not switch (and close) the user's interactive figures;
    every figure made here is closed after saving in any case.
    """
    matplotlib = require("matplotlib", "figures")

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    plt = pyplot()
    try:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)


def _text_colour(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _fmt_delta(d: float) -> str:
    d = int(round(d))
    return f"+{d}" if d > 0 else ("\u2212" + str(-d) if d < 0 else "0")


def _rank_norm(vmin: float, vmax: float):
    """Discrete colours for a small integer range, continuous otherwise."""
    from matplotlib import colors

    lo, hi = math.floor(vmin), math.ceil(vmax)
    if hi - lo <= 24:
        bounds = np.arange(lo - 0.5, hi + 1.0, 1.0)
        return colors.BoundaryNorm(bounds, ncolors=256), True
    return colors.Normalize(vmin=lo, vmax=hi), False


def _draw_grid(ax, mat, layers, types, *, cmap, norm, annotate, fmt, zero_blank=False):
    """Heatmap with layers on x and module types on y.  Returns the image."""
    data = np.ma.masked_invalid(mat.T)
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_facecolor("#e6e6e6")  # absent (layer, type) cells
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(len(types)))
    ax.set_yticklabels(types, fontsize=8)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_xticks(np.arange(-0.5, len(layers), 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, len(types), 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if annotate:
        for i in range(len(layers)):
            for j in range(len(types)):
                v = mat[i, j]
                if np.isnan(v):
                    ax.text(i, j, "\u2013", ha="center", va="center", fontsize=8, color="#888888")
                    continue
                if zero_blank and round(v) == 0:
                    label, colour = "0", "#999999"
                else:
                    label, colour = fmt(v), _text_colour(im.cmap(im.norm(v)))
                ax.text(i, j, label, ha="center", va="center", fontsize=8, color=colour)
    return im


# Figures
# ---------------------------------------------------------------------------------------------


# Over 80 lines: one figure drawn step by step on shared axes (grid, annotations, colour bar,
# labels); split up, every helper would need the same half-dozen matplotlib objects.
def plot_rank_heatmap(
    pattern: Mapping[str, int],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    initial: Mapping[str, int] | None = None,
) -> None:
    """Heatmap of the rank per (layer, module type), as in Figures 2-3 of the ElaLoRA paper.

    Layers run along x, module types along y; each cell is annotated with its rank when the
    grid is small enough (at most 150 cells), grey cells are absent modules.  With
    ``initial``, a second panel shows the change versus the initial pattern on a diverging
    colour map (red = rank gained, blue = rank given away), annotated with the signed change.
    """
    if not pattern:
        raise ValueError("plot_rank_heatmap: empty rank pattern")
    plt = pyplot()
    mat, layers, types = rank_matrix(pattern)
    note = unlayered_note(pattern)
    if mat.size == 0:
        # Nothing has a layer index: draw one row of modules.
        types = list(pattern)
        layers = [0]
        mat = np.array([[float(pattern[n]) for n in types]])
        note = None
    n_l, n_t = len(layers), len(types)
    annotate = n_l * n_t <= _ANNOTATE_MAX_CELLS

    diff = None
    if initial is not None:
        diff = np.full_like(mat, np.nan)
        keys = module_keys(list(pattern) + [n for n in initial if n not in pattern])
        li = {layer: i for i, layer in enumerate(layers)}
        ti = {t: j for j, t in enumerate(types)}
        init_mat = np.full_like(mat, np.nan)
        for name, r in initial.items():
            layer, mtype = keys[name]
            if layer in li and mtype in ti:
                i, j = li[layer], ti[mtype]
                init_mat[i, j] = r if np.isnan(init_mat[i, j]) else init_mat[i, j] + r
        diff = np.where(np.isnan(mat), np.nan, mat - np.nan_to_num(init_mat, nan=0.0))

    cell_w = 0.42 if annotate else 0.3
    cell_h = 0.36 if annotate else 0.3
    label_w = 0.075 * max(len(t) for t in types) + 0.4
    width = min(max(label_w + n_l * cell_w + 1.6, 6.0), 22.0)
    panel_h = max(n_t * cell_h, 1.2) + 0.9
    n_panels = 2 if diff is not None else 1
    height = panel_h * n_panels + 0.6 + (0.25 if note else 0.0)
    fig, axes = plt.subplots(n_panels, 1, figsize=(width, height), layout="constrained", squeeze=False)
    try:
        axes = axes[:, 0]
        finite = mat[np.isfinite(mat)]
        norm, discrete = _rank_norm(float(finite.min()), float(finite.max()))
        cmap = plt.get_cmap("YlGnBu")
        im = _draw_grid(axes[0], mat, layers, types, cmap=cmap, norm=norm, annotate=annotate, fmt=fmt_int)
        cb = fig.colorbar(im, ax=axes[0], pad=0.01, fraction=0.04, aspect=max(8, 2.2 * n_t))
        cb.set_label("rank", fontsize=9)
        cb.ax.tick_params(labelsize=8)
        _integer_ticks(cb, norm, discrete)
        total = int(round(np.nansum(mat))) + sum(unlayered(pattern).values())
        ranks = np.array([float(r) for r in pattern.values()])
        default = (
            f"Rank per module \u2014 total {total} over {len(pattern)} modules, "
            f"mean {ranks.mean():.2f}, min {int(ranks.min())}, max {int(ranks.max())}"
        )
        axes[0].set_title(title or default, fontsize=10, loc="left")
        if diff is not None:
            from matplotlib import colors

            fin = diff[np.isfinite(diff)]
            lim = max(1.0, float(np.abs(fin).max()) if fin.size else 1.0)
            dnorm, ddiscrete = (
                (colors.BoundaryNorm(np.arange(-math.ceil(lim) - 0.5, math.ceil(lim) + 1.0), 256), True)
                if lim <= 12
                else (colors.Normalize(-lim, lim), False)
            )
            im2 = _draw_grid(
                axes[1], diff, layers, types, cmap=plt.get_cmap("RdBu_r"), norm=dnorm,
                annotate=annotate, fmt=_fmt_delta, zero_blank=True,
            )
            cb2 = fig.colorbar(im2, ax=axes[1], pad=0.01, fraction=0.04, aspect=max(8, 2.2 * n_t))
            cb2.set_label("\u0394 rank", fontsize=9)
            cb2.ax.tick_params(labelsize=8)
            _integer_ticks(cb2, dnorm, ddiscrete)
            init_total = sum(int(r) for r in initial.values())
            moved = int(round(np.nansum(np.clip(fin, 0, None)))) if fin.size else 0
            axes[1].set_title(
                f"Change vs initial pattern (initial total {init_total} \u2192 final {total}; "
                f"{moved} rank(s) gained, {int(round(-np.nansum(np.clip(fin, None, 0)))) if fin.size else 0} "
                "given away)",
                fontsize=10, loc="left",
            )
        if note:
            fig.text(0.0, 0.0, note, fontsize=7.5, color="#555555", ha="left", va="top",
                     transform=fig.transFigure)
        save_figure(fig, path)
    except BaseException:
        plt.close(fig)
        raise


def _integer_ticks(cb, norm, discrete: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    if discrete:
        lo = norm.boundaries[0] + 0.5
        hi = norm.boundaries[-1] - 0.5
        n = int(hi - lo) + 1
        step = max(1, math.ceil(n / 10))
        cb.set_ticks(np.arange(lo, hi + 0.5, step))
    else:
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    cb.minorticks_off()


def _seq_cmap():
    """viridis without its lightest (hard to see on white) end."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.88, 256)))


def _group_colours(plt, groups: Sequence, use_cmap: bool):
    if use_cmap:
        cmap = _seq_cmap()
        numeric = [g for g in groups if not isinstance(g, str)]
        lo, hi = (min(numeric), max(numeric)) if numeric else (0, 1)
        if len(numeric) == len(groups):
            return {g: cmap((g - lo) / (hi - lo) if hi > lo else 0.0) for g in groups}
        return {g: cmap(k / max(len(groups) - 1, 1)) for k, g in enumerate(groups)}
    cyc = plt.get_cmap("tab10") if len(groups) <= 10 else plt.get_cmap("tab20")
    return {g: cyc(k % cyc.N) for k, g in enumerate(groups)}


# Over 80 lines: one figure drawn step by step on shared axes (lines or stacked areas, legend or
# colour bar, markers of the rounds); split up, every helper would need the same axes state.
def plot_rank_over_time(
    initial: Mapping[str, int],
    events: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    total_steps: int | None = None,
    group_by: str = "type",
) -> None:
    """Rank over training steps.

    Top panel: total rank per module type (``group_by="type"``) or per layer
    (``group_by="layer"``) as step lines, and the overall total rank as a dashed black line on
    a secondary axis, with a note saying whether the budget stayed constant.  Bottom panel: a
    thin line per module, coloured by its group.  Dotted vertical lines mark the steps where
    rank-adjustment rounds happened.  Without events (plain LoRA) the lines are flat.
    """
    if group_by not in ("type", "layer"):
        raise ValueError(f"group_by must be 'type' or 'layer', not {group_by!r}")
    if not initial and not events:
        raise ValueError("plot_rank_over_time: no initial pattern and no events")
    plt = pyplot()
    steps, ranks = rank_timeline(initial, events)
    round_steps = steps[1:]
    last = steps[-1]
    end = total_steps if total_steps is not None and total_steps > last else None
    if end is None and not round_steps:
        end = max(int(total_steps or 0), 1)
    x = np.array(steps + ([end] if end is not None else []), dtype=float)

    def extend(v: list[int]) -> np.ndarray:
        return np.array(v + ([v[-1]] if end is not None else []), dtype=float)

    keys = module_keys(ranks)
    groups: list = []
    member: dict[str, object] = {}
    for name in ranks:
        layer, mtype = keys[name]
        g = mtype if group_by == "type" else ("other" if layer is None else layer)
        member[name] = g
        if g not in groups:
            groups.append(g)
    if group_by == "layer":
        groups.sort(key=lambda g: (isinstance(g, str), g if not isinstance(g, str) else 0))
    use_cmap = len(groups) > _LEGEND_MAX_ENTRIES
    colours = _group_colours(plt, groups, use_cmap)

    totals = np.zeros(len(x))
    group_tot = {g: np.zeros(len(x)) for g in groups}
    for name, r in ranks.items():
        y = extend(r)
        totals += y
        group_tot[member[name]] += y

    fig, (ax_top, ax_bot) = plt.subplots(
        2, 1, figsize=(10.5, 7.2), sharex=True, layout="constrained",
        gridspec_kw={"height_ratios": [1.15, 1.0]},
    )
    try:
        for g in groups:
            ax_top.plot(x, group_tot[g], drawstyle="steps-post", color=colours[g], lw=1.6,
                        label=str(g) if group_by == "type" else f"layer {g}")
        ax_top.set_ylabel(f"total rank per {'module type' if group_by == 'type' else 'layer'}", fontsize=9)
        ax2 = ax_top.twinx()
        ax2.plot(x, totals, drawstyle="steps-post", color="black", ls="--", lw=1.3, label="total rank")
        t0, t1 = int(totals[0]), int(totals[-1])
        tmin, tmax = int(totals.min()), int(totals.max())
        # The total sits in a band at the top of the panel, above the per-group lines.
        span = max(float(tmax - tmin), 1.0, 0.02 * abs(tmax))
        h = span / 0.2
        ax2.set_ylim(tmax + 0.06 * h - h, tmax + 0.06 * h)
        gvals = np.concatenate([group_tot[g] for g in groups]) if groups else np.zeros(1)
        gmin, gmax = float(gvals.min()), float(gvals.max())
        gspan = max(gmax - gmin, 1.0)
        ax_top.set_ylim(gmin - 0.05 * gspan, gmax + 0.4 * gspan)
        ax2.set_ylabel("total rank (all modules)", fontsize=9)
        ax2.tick_params(labelsize=8)
        if tmin == tmax:
            budget = f"total rank {t0}, constant over {len(round_steps)} round(s)"
        else:
            budget = f"total rank {t0} \u2192 {t1} (min {tmin}, max {tmax}; not constant)"
        n_changes = sum(1 for e in events if int(e["old_rank"]) != int(e["new_rank"]))
        if round_steps:
            summary = f"{budget}; {n_changes} module rank change(s) in {len(round_steps)} round(s)"
        else:
            summary = f"total rank {t0}; no rank-adjustment rounds (fixed ranks)"
        ax_top.set_title(summary, fontsize=10, loc="left")
        for name, r in ranks.items():
            ax_bot.plot(x, extend(r), drawstyle="steps-post", color=colours[member[name]],
                        lw=0.7, alpha=0.55)
        ax_bot.set_ylabel("rank per module", fontsize=9)
        ax_bot.set_xlabel("training step", fontsize=9)
        from matplotlib.ticker import MaxNLocator

        ax_bot.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_top.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_yticks(sorted({tmin, tmax, t0, t1}))
        alpha = 0.5 if len(round_steps) <= 60 else 0.2
        for ax in (ax_top, ax_bot):
            for s in round_steps:
                ax.axvline(s, color="#888888", lw=0.6, ls=":", alpha=alpha, zorder=0)
            ax.tick_params(labelsize=8)
            ax.grid(axis="y", color="#eeeeee", lw=0.6)
            ax.set_axisbelow(True)
        ax_bot.set_xlim(x[0], x[-1] if x[-1] > x[0] else x[0] + 1)

        from matplotlib.lines import Line2D

        extra = [Line2D([], [], color="black", ls="--", lw=1.3, label="total rank (right axis)")]
        if round_steps:
            extra.append(Line2D([], [], color="#888888", ls=":", lw=0.8, label="rank-adjustment round"))
        handles, _ = ax_top.get_legend_handles_labels()
        if use_cmap:
            from matplotlib import colors
            from matplotlib.cm import ScalarMappable

            numeric = [g for g in groups if not isinstance(g, str)]
            if len(numeric) == len(groups):
                lo, hi = min(numeric), max(numeric)
                sm = ScalarMappable(norm=colors.Normalize(lo, hi if hi > lo else lo + 1), cmap=_seq_cmap())
                cb = fig.colorbar(sm, ax=[ax_top, ax_bot], pad=0.01, aspect=40)
                cb.set_label("layer" if group_by == "layer" else "group", fontsize=9)
                cb.ax.tick_params(labelsize=8)
                cb.locator = MaxNLocator(integer=True)
                cb.update_ticks()
                handles = []
            else:
                handles = handles[:_LEGEND_MAX_ENTRIES]
                extra.insert(0, Line2D([], [], color="none",
                                       label=f"(first {_LEGEND_MAX_ENTRIES} of {len(groups)} groups)"))
        if handles:
            ax_top.legend(handles=handles + extra, fontsize=8, loc="upper left",
                          bbox_to_anchor=(1.08, 1.0), frameon=False, borderaxespad=0.0)
        else:  # the colour bar takes the right-hand side
            try:
                fig.legend(handles=extra, fontsize=8, loc="outside lower center", ncols=2, frameon=False)
            except (TypeError, ValueError):  # matplotlib < 3.7
                ax_bot.legend(handles=extra, fontsize=8, loc="lower right", frameon=False)
        save_figure(fig, path)
    except BaseException:
        plt.close(fig)
        raise
