"""Figures and tables that show where the ranks went during adaptive-rank LoRA fine-tuning.

This is the only module of the package that plots.  Nothing is drawn or written unless one of
the ``plot_*`` functions (or :func:`write_all_figures`) is called with an output path; the PNG
files are written with matplotlib's non-interactive "Agg" backend and every figure is closed
after saving.  matplotlib is imported lazily, so :func:`format_rank_table` (used by
``elalora inspect``) and the pure-data helpers work without touching it.

Data formats (plain Python data, already parsed):

* rank pattern: ``dict[str, int]``, module name -> rank (Hugging Face module names);
* rank history events: ``list[dict]`` with keys ``step``, ``module``, ``old_rank``,
  ``new_rank`` and ``scores`` (the importance scores of that module's active ranks at that
  round, possibly empty), in step order; all events with the same step form one round;
* importance scores: ``dict[str, list[float]]``, module -> final per-rank scores;
* intrinsic dimensions (GeLoRA): ``list[float]`` d_0..d_L, one per hidden state.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "split_module_name",
    "rank_matrix",
    "plot_rank_heatmap",
    "rank_timeline",
    "plot_rank_over_time",
    "plot_score_distribution",
    "plot_intrinsic_dimensions",
    "format_rank_table",
    "write_all_figures",
]

_LAYER_RE = re.compile(r"\.(layer|layers|h|block|blocks)\.(\d+)\.")

_DPI = 110
# Grids with more cells than this are drawn without per-cell numbers.
_ANNOTATE_MAX_CELLS = 150
# Legends with more entries than this are replaced by a colour bar.
_LEGEND_MAX_ENTRIES = 12


# ---------------------------------------------------------------------------------------------
# Module names
# ---------------------------------------------------------------------------------------------


def _split_full(name: str) -> tuple[str, int | None, str]:
    """(prefix before the layer container, layer index, module type)."""
    # A leading "." lets names that start with the container ("layers.3.mlp") match too.
    m = _LAYER_RE.search("." + name)
    if m is None:
        return "", None, name
    prefix = name[: max(m.start() - 1, 0)]
    return prefix, int(m.group(2)), name[m.end() - 1 :]


def split_module_name(name: str) -> tuple[int | None, str]:
    """Split a module name into (layer index, module type).

    >>> split_module_name("bert.encoder.layer.3.attention.output.dense")
    (3, 'attention.output.dense')
    >>> split_module_name("model.layers.11.mlp.up_proj")
    (11, 'mlp.up_proj')
    >>> split_module_name("transformer.h.2.attn.c_attn")
    (2, 'attn.c_attn')
    >>> split_module_name("classifier")
    (None, 'classifier')

    The first ``.layer|layers|h|block|blocks.<int>.`` occurrence is used; the module type is
    everything after the index.  Names without a layer index give ``(None, name)``.
    """
    _, layer, mtype = _split_full(name)
    return layer, mtype


def _module_keys(names: Iterable[str]) -> dict[str, tuple[int | None, str]]:
    """Map each module name to (layer, type label) for grouping.

    Usually the label is the module type of :func:`split_module_name`.  In encoder-decoder
    models (BART/T5: "model.encoder.layers.0.self_attn.q_proj" and
    "model.decoder.layers.0.self_attn.q_proj") the same (layer, type) occurs under several
    prefixes; the type label is then qualified with the last component of the prefix
    ("encoder.self_attn.q_proj"), or with the whole prefix if that is still ambiguous.
    """
    names = list(names)
    parts = {n: _split_full(n) for n in names}
    prefixes_of: dict[tuple[int, str], set[str]] = {}
    for prefix, layer, mtype in parts.values():
        if layer is not None:
            prefixes_of.setdefault((layer, mtype), set()).add(prefix)
    ambiguous = any(len(p) > 1 for p in prefixes_of.values())
    if not ambiguous:
        return {n: (layer, mtype) for n, (_, layer, mtype) in parts.items()}
    layered_prefixes = {p for p, layer, _ in parts.values() if layer is not None}
    short = {p: (p.rsplit(".", 1)[-1] if p else "") for p in layered_prefixes}
    if len(set(short.values())) < len(short):
        short = {p: p for p in layered_prefixes}
    out = {}
    for n, (prefix, layer, mtype) in parts.items():
        if layer is None:
            out[n] = (None, mtype)
        else:
            tag = short[prefix]
            out[n] = (layer, f"{tag}.{mtype}" if tag else mtype)
    return out


def _short_labels(types: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffix of each type that is not a suffix of any other type.

    BERT: "attention.self.query" -> "query", "attention.output.dense" stays whole,
    "intermediate.dense" -> "intermediate.dense"; LLaMA: "self_attn.q_proj" -> "q_proj".
    """
    out = {}
    for t in types:
        comps = t.split(".")
        label = t
        for k in range(1, len(comps) + 1):
            cand = ".".join(comps[-k:])
            if not any(o != t and (o == cand or o.endswith("." + cand)) for o in types):
                label = cand
                break
        out[t] = label
    return out


def rank_matrix(pattern: Mapping[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """Rank pattern as a (layers × module types) float matrix.

    Returns ``(matrix, layers, types)``: ``layers`` are the layer indices present, sorted;
    ``types`` are the module types in first-seen order; cells without a module are NaN.
    Modules without a layer index (e.g. "classifier") are not part of the matrix.
    """
    keys = _module_keys(pattern)
    layers = sorted({layer for layer, _ in keys.values() if layer is not None})
    types: list[str] = []
    for layer, mtype in keys.values():
        if layer is not None and mtype not in types:
            types.append(mtype)
    mat = np.full((len(layers), len(types)), np.nan, dtype=float)
    li = {layer: i for i, layer in enumerate(layers)}
    ti = {t: j for j, t in enumerate(types)}
    for name, rank in pattern.items():
        layer, mtype = keys[name]
        if layer is None:
            continue
        i, j = li[layer], ti[mtype]
        # Two names can only land in one cell through pathological naming; keep the sum so
        # the matrix total still equals the pattern total.
        mat[i, j] = float(rank) if np.isnan(mat[i, j]) else mat[i, j] + float(rank)
    return mat, layers, types


def _unlayered(pattern: Mapping[str, int]) -> dict[str, int]:
    return {n: int(r) for n, r in pattern.items() if split_module_name(n)[0] is None}


# ---------------------------------------------------------------------------------------------
# Rank history
# ---------------------------------------------------------------------------------------------


def _sorted_events(events: Sequence[Mapping] | None) -> list[Mapping]:
    events = list(events or [])
    # Stable: keeps the given order within one step.
    return sorted(events, key=lambda e: int(e["step"]))


def rank_timeline(
    initial: Mapping[str, int], events: Sequence[Mapping]
) -> tuple[list[int], dict[str, list[int]]]:
    """Replay the rank history.

    Returns ``(steps, ranks)``.  ``steps[0]`` is 0 and stands for the initial pattern; then
    one entry per round (distinct event step, in order).  ``ranks[module][k]`` is the rank of
    the module after all events of ``steps[k]`` were applied, so ``ranks[m][-1]`` is the final
    rank.  Modules that only appear in the events start at the ``old_rank`` of their first
    event.
    """
    events = _sorted_events(events)
    current: dict[str, int] = {n: int(r) for n, r in initial.items()}
    for ev in events:
        current.setdefault(ev["module"], int(ev["old_rank"]))
    ranks: dict[str, list[int]] = {n: [r] for n, r in current.items()}
    steps = [0]
    i = 0
    while i < len(events):
        step = int(events[i]["step"])
        while i < len(events) and int(events[i]["step"]) == step:
            current[events[i]["module"]] = int(events[i]["new_rank"])
            i += 1
        steps.append(step)
        for n, r in current.items():
            ranks[n].append(r)
    return steps, ranks


def _final_pattern(initial: Mapping[str, int], events: Sequence[Mapping]) -> dict[str, int]:
    _, ranks = rank_timeline(initial, events)
    return {n: r[-1] for n, r in ranks.items()}


# ---------------------------------------------------------------------------------------------
# matplotlib helpers
# ---------------------------------------------------------------------------------------------


def _pyplot():
    """pyplot on the Agg backend.

    The backend is only forced when pyplot has not been imported yet, so calling these
    functions from a notebook does not switch (and close) the user's interactive figures;
    every figure made here is closed after saving in any case.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    plt = _pyplot()
    try:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=_DPI, format="png", bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)


def _text_colour(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _fmt_int(x: float) -> str:
    return str(int(round(x)))


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


def _unlayered_note(pattern: Mapping[str, int], limit: int = 4) -> str | None:
    other = _unlayered(pattern)
    if not other:
        return None
    items = [f"{n}: {r}" for n, r in list(other.items())[:limit]]
    more = f", +{len(other) - limit} more" if len(other) > limit else ""
    return (
        f"not in the grid: {len(other)} module(s) without a layer index "
        f"(rank {sum(other.values())} in total) \u2014 " + ", ".join(items) + more
    )


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


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
    plt = _pyplot()
    mat, layers, types = rank_matrix(pattern)
    note = _unlayered_note(pattern)
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
        keys = _module_keys(list(pattern) + [n for n in initial if n not in pattern])
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
        im = _draw_grid(axes[0], mat, layers, types, cmap=cmap, norm=norm, annotate=annotate, fmt=_fmt_int)
        cb = fig.colorbar(im, ax=axes[0], pad=0.01, fraction=0.04, aspect=max(8, 2.2 * n_t))
        cb.set_label("rank", fontsize=9)
        cb.ax.tick_params(labelsize=8)
        _integer_ticks(cb, norm, discrete)
        total = int(round(np.nansum(mat))) + sum(_unlayered(pattern).values())
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
        _save(fig, path)
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
    plt = _pyplot()
    steps, ranks = rank_timeline(initial, events)
    round_steps = steps[1:]
    last = steps[-1]
    end = total_steps if total_steps is not None and total_steps > last else None
    if end is None and not round_steps:
        end = max(int(total_steps or 0), 1)
    x = np.array(steps + ([end] if end is not None else []), dtype=float)

    def extend(v: list[int]) -> np.ndarray:
        return np.array(v + ([v[-1]] if end is not None else []), dtype=float)

    keys = _module_keys(ranks)
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
                extra.insert(0, Line2D([], [], color="none", label=f"(first {_LEGEND_MAX_ENTRIES} of {len(groups)} groups)"))
        if handles:
            ax_top.legend(handles=handles + extra, fontsize=8, loc="upper left",
                          bbox_to_anchor=(1.08, 1.0), frameon=False, borderaxespad=0.0)
        else:  # the colour bar takes the right-hand side
            try:
                fig.legend(handles=extra, fontsize=8, loc="outside lower center", ncols=2, frameon=False)
            except (TypeError, ValueError):  # matplotlib < 3.7
                ax_bot.legend(handles=extra, fontsize=8, loc="lower right", frameon=False)
        _save(fig, path)
    except BaseException:
        plt.close(fig)
        raise


def _scores_from_events(events: Sequence[Mapping] | None) -> tuple[dict[str, list[float]], int | None]:
    last: dict[str, list[float]] = {}
    step = None
    for ev in _sorted_events(events):
        sc = ev.get("scores")
        if sc is not None and len(sc):
            last[ev["module"]] = [float(v) for v in sc]
            step = int(ev["step"])
    return last, step


def _has_scores(scores: Mapping[str, Sequence[float]] | None) -> bool:
    return bool(scores) and any(v is not None and len(v) for v in scores.values())


def plot_score_distribution(
    scores: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    events: Sequence[Mapping] | None = None,
) -> None:
    """Distribution of the per-rank importance scores.

    Left: a histogram of all scores (log x axis when the positive scores span two or more
    orders of magnitude; zeros cannot be shown on it and are counted in the title).  Right: a
    box plot per module type.  If ``scores`` is empty, the last non-empty scores of each module
    in ``events`` are used.
    """
    source = "final importance scores"
    if not _has_scores(scores):
        scores, step = _scores_from_events(events)
        source = f"importance scores from each module's last round (latest step {step})"
    if not _has_scores(scores):
        raise ValueError("plot_score_distribution: no scores (neither given nor in the events)")
    plt = _pyplot()

    keys = _module_keys(scores)
    per_type: dict[str, list[float]] = {}
    for name, vals in scores.items():
        if vals is not None and len(vals):
            per_type.setdefault(keys[name][1], []).extend(float(v) for v in vals)
    allv = np.concatenate([np.asarray(v, dtype=float) for v in per_type.values()])
    n_total = allv.size
    n_nonfinite = int((~np.isfinite(allv)).sum())
    allv = allv[np.isfinite(allv)]
    if allv.size == 0:
        raise ValueError("plot_score_distribution: no finite scores")
    pos = allv[allv > 0]
    n_zero = int((allv == 0).sum())
    n_neg = int((allv < 0).sum())
    log = n_neg == 0 and pos.size > 1 and pos.max() / pos.min() >= 100.0

    n_types = len(per_type)
    fig, (ax_h, ax_b) = plt.subplots(
        1, 2, figsize=(12.0, max(4.2, 0.32 * n_types + 1.8)), layout="constrained",
        gridspec_kw={"width_ratios": [1.0, 1.1]},
    )
    try:
        nbins = int(np.clip(np.sqrt(allv.size) * 2, 10, 60))
        if log:
            bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()), nbins + 1)
            ax_h.hist(pos, bins=bins, color="#3b7dbf", edgecolor="white", linewidth=0.4)
            ax_h.set_xscale("log")
        else:
            ax_h.hist(allv, bins=nbins, color="#3b7dbf", edgecolor="white", linewidth=0.4)
        ax_h.set_xlabel("importance score" + (" (log scale)" if log else ""), fontsize=9)
        ax_h.set_ylabel("number of ranks", fontsize=9)
        ax_h.tick_params(labelsize=8)
        stats = [f"{n_total} scores"]
        if log and n_zero:
            stats.append(f"{n_zero} zero(s) not shown on the log axis")
        elif n_zero:
            stats.append(f"{n_zero} zero(s)")
        if n_nonfinite:
            stats.append(f"{n_nonfinite} non-finite dropped")
        med = float(np.median(allv))
        stats.append(f"median {med:.3g}")
        ax_h.set_title(", ".join(stats), fontsize=9, loc="left")
        if not log or med > 0:
            ax_h.axvline(med, color="#c0392b", lw=1.0, ls="--", label=f"median {med:.3g}")

        labels, data = [], []
        for t, vals in per_type.items():
            v = np.asarray(vals, dtype=float)
            v = v[np.isfinite(v)]
            if log:
                v = v[v > 0]
            if v.size:
                labels.append(t)
                data.append(v)
        positions = np.arange(1, len(data) + 1)
        try:
            bp = ax_b.boxplot(data, positions=positions, orientation="horizontal", widths=0.6,
                              patch_artist=True, showfliers=True, flierprops={"markersize": 2.5})
        except TypeError:  # matplotlib < 3.10
            bp = ax_b.boxplot(data, positions=positions, vert=False, widths=0.6,
                              patch_artist=True, showfliers=True, flierprops={"markersize": 2.5})
        for patch in bp["boxes"]:
            patch.set_facecolor("#a9cce3")
            patch.set_edgecolor("#1f4e79")
        ax_b.set_yticks(positions)
        ax_b.set_yticklabels(labels, fontsize=8)
        ax_b.invert_yaxis()  # first-seen type on top
        if log:
            ax_b.set_xscale("log")
        ax_b.set_xlabel("importance score" + (" (log scale)" if log else ""), fontsize=9)
        ax_b.tick_params(labelsize=8)
        ax_b.set_title("per module type", fontsize=9, loc="left")
        fig.suptitle(f"Per-rank {source}", fontsize=10, x=0.0, ha="left")
        _save(fig, path)
    except BaseException:
        plt.close(fig)
        raise


def plot_intrinsic_dimensions(
    ids: Sequence[float],
    path: str | os.PathLike,
    *,
    block_ranks: Sequence[int] | None = None,
) -> None:
    """GeLoRA: intrinsic dimension per hidden state and the resulting rank per block.

    Top: d_0..d_L against the hidden-state index.  Bottom (with ``block_ranks``): bars with
    the rank given to each block; when there are L blocks for L+1 hidden states, the
    increase ``max(d_{i+1} - d_i, 0)`` is overlaid as a dashed line for comparison.
    """
    ids = [float(v) for v in ids]
    if not ids:
        raise ValueError("plot_intrinsic_dimensions: no intrinsic dimensions")
    plt = _pyplot()
    has_bars = block_ranks is not None and len(block_ranks) > 0
    n = len(ids)
    width = min(max(6.5, 0.28 * max(n, len(block_ranks or [])) + 3.0), 18.0)
    fig, axes = plt.subplots(2 if has_bars else 1, 1, figsize=(width, 6.4 if has_bars else 3.6),
                             layout="constrained", squeeze=False)
    try:
        ax = axes[0, 0]
        xs = np.arange(n)
        ax.plot(xs, ids, marker="o", ms=4, color="#1f77b4", lw=1.5)
        ax.set_xlabel("hidden state (0 = embeddings)", fontsize=9)
        ax.set_ylabel("intrinsic dimension", fontsize=9)
        ax.set_title(
            f"Intrinsic dimension per hidden state (min {min(ids):.3g}, max {max(ids):.3g})",
            fontsize=10, loc="left",
        )
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n, 20)))
        ax.tick_params(labelsize=8)
        ax.grid(color="#eeeeee", lw=0.6)
        if has_bars:
            axb = axes[1, 0]
            br = np.asarray(block_ranks, dtype=float)
            bx = np.arange(len(br))
            bars = axb.bar(bx, br, color="#2ca02c", width=0.75, label="rank per block")
            if len(br) <= 40:
                axb.bar_label(bars, labels=[_fmt_int(v) for v in br], fontsize=7, padding=1.5)
            top = max(float(br.max()), 1.0)
            if len(br) == n - 1:
                inc = np.clip(np.diff(np.asarray(ids)), 0, None)
                top = max(top, float(inc.max()))
                axb.plot(bx, inc, ls="none", marker="_", ms=max(4.0, min(16.0, 300.0 / len(br))),
                         mew=2.0, color="#d62728",
                         label="ID increase max(d\u1d62\u208a\u2081 \u2212 d\u1d62, 0)")
            axb.set_xlabel("transformer block", fontsize=9)
            axb.set_ylabel("rank", fontsize=9)
            axb.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(br), 20)))
            axb.yaxis.set_major_locator(MaxNLocator(integer=True))
            axb.set_ylim(0, top * 1.35)
            axb.tick_params(labelsize=8)
            axb.legend(fontsize=8, frameon=False, loc="upper right", ncols=2)
            axb.set_title(f"Rank per block (total {int(round(br.sum()))})", fontsize=10, loc="left")
        _save(fig, path)
    except BaseException:
        plt.close(fig)
        raise


# ---------------------------------------------------------------------------------------------
# Text table
# ---------------------------------------------------------------------------------------------


def format_rank_table(
    pattern: Mapping[str, int],
    *,
    capacity: Mapping[str, int] | None = None,
    params: Mapping[str, int] | None = None,
) -> str:
    """Plain-text table of a rank pattern (used by ``elalora inspect``).

    Rows are layers and columns module types (headed by their shortest unambiguous suffix,
    e.g. "query", "q_proj"), a cell is the rank, or "rank/capacity" when ``capacity`` (module
    -> maximum rank) is given; "-" marks an absent module.  A "total" column and row sum the
    ranks.  Modules without a layer index are listed below the grid.  The footer gives the
    number of modules, total, mean, min and max rank (with the module names), the capacity use
    if ``capacity`` is given, and the trainable parameter total if ``params`` (module ->
    trainable parameter count) is given.
    """
    if not pattern:
        lines = ["(empty rank pattern)", "modules: 0   total rank: 0"]
        if params is not None:
            lines.append(f"trainable parameters: {sum(int(v) for v in params.values()):,}")
        return "\n".join(lines)

    mat, layers, types = rank_matrix(pattern)
    keys = _module_keys(pattern)
    cap_mat = None
    if capacity is not None:
        cap_mat = np.full_like(mat, np.nan)
        li = {layer: i for i, layer in enumerate(layers)}
        ti = {t: j for j, t in enumerate(types)}
        for name in pattern:
            layer, mtype = keys[name]
            if layer is not None and name in capacity:
                i, j = li[layer], ti[mtype]
                c = float(capacity[name])
                cap_mat[i, j] = c if np.isnan(cap_mat[i, j]) else cap_mat[i, j] + c

    def cell(i: int, j: int) -> str:
        v = mat[i, j]
        if np.isnan(v):
            return "-"
        s = _fmt_int(v)
        if cap_mat is not None and not np.isnan(cap_mat[i, j]):
            s += "/" + _fmt_int(cap_mat[i, j])
        return s

    lines: list[str] = []
    if layers:
        short = _short_labels(types)
        header = ["layer"] + [short[t] for t in types] + ["total"]
        rows = []
        for i, layer in enumerate(layers):
            row_total = int(round(np.nansum(mat[i])))
            rows.append([str(layer)] + [cell(i, j) for j in range(len(types))] + [str(row_total)])
        col_tot = [str(int(round(np.nansum(mat[:, j])))) for j in range(len(types))]
        foot = ["total"] + col_tot + [str(int(round(np.nansum(mat))))]
        widths = [max(len(r[k]) for r in [header, foot] + rows) for k in range(len(header))]

        def fmt_row(r: list[str]) -> str:
            first = r[0].rjust(widths[0])
            rest = "  ".join(c.rjust(w) for c, w in zip(r[1:], widths[1:]))
            return f"{first} | {rest}"

        sep = "-" * (widths[0] + 1) + "+" + "-" * (len(fmt_row(header)) - widths[0] - 2)
        lines.append(fmt_row(header))
        lines.append(sep)
        lines.extend(fmt_row(r) for r in rows)
        lines.append(sep)
        lines.append(fmt_row(foot))
        renamed = [(short[t], t) for t in types if short[t] != t]
        if renamed:
            width = max(len(sep), 60)
            cur = "columns:"
            for k, (a, t) in enumerate(renamed):
                item = f" {a} = {t}" + ("," if k < len(renamed) - 1 else "")
                if len(cur) + len(item) > width and cur.strip() != "columns:":
                    lines.append(cur)
                    cur = "        "
                cur += item
            lines.append(cur)

    other = _unlayered(pattern)
    if other:
        if lines:
            lines.append("")
        lines.append("modules without a layer index:")
        w = max(len(n) for n in other)
        for n, r in other.items():
            s = str(r)
            if capacity is not None and n in capacity:
                s += f"/{int(capacity[n])}"
            lines.append(f"  {n.ljust(w)}  {s}")

    ranks = {n: int(r) for n, r in pattern.items()}
    total = sum(ranks.values())
    mn = min(ranks, key=ranks.get)
    mx = max(ranks, key=ranks.get)
    lines.append("")
    lines.append(f"modules: {len(ranks)}   total rank: {total}   mean rank: {total / len(ranks):.2f}")
    lines.append(f"min rank: {ranks[mn]} ({mn})")
    lines.append(f"max rank: {ranks[mx]} ({mx})")
    if capacity is not None:
        cap_total = sum(int(capacity[n]) for n in ranks if n in capacity)
        used = sum(ranks[n] for n in ranks if n in capacity)
        pct = f"{100.0 * used / cap_total:.1f}%" if cap_total else "n/a"
        lines.append(f"capacity: {cap_total} total, {used} in use ({pct})")
    if params is not None:
        lines.append(f"trainable parameters: {sum(int(v) for v in params.values()):,}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------


def write_all_figures(
    run_dir: str | os.PathLike,
    *,
    initial: Mapping[str, int] | None,
    final: Mapping[str, int] | None,
    events: Sequence[Mapping] | None,
    scores: Mapping[str, Sequence[float]] | None = None,
    ids: Sequence[float] | None = None,
    block_ranks: Sequence[int] | None = None,
    total_steps: int | None = None,
) -> list[str]:
    """Write the standard figures into ``run_dir/figures/`` and return their paths.

    * ``rank_heatmap.png``: the final pattern (replayed from ``initial`` + ``events`` when
      ``final`` is empty), with a change panel when it differs from ``initial``;
    * ``rank_over_time.png``: drawn flat when there are no events (plain LoRA);
    * ``score_distribution.png``: only when there are scores (given or in the events);
    * ``intrinsic_dimensions.png``: only when ``ids`` is non-empty.

    A figure whose data is empty is skipped; the others are still written.
    """
    initial = dict(initial or {})
    events = list(events or [])
    final = dict(final or {})
    if not final and (initial or events):
        final = _final_pattern(initial, events)
    if not initial and final and not events:
        initial = dict(final)
    out_dir = os.path.join(os.fspath(run_dir), "figures")
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []

    if final:
        p = os.path.join(out_dir, "rank_heatmap.png")
        changed = bool(initial) and any(int(initial.get(n, -1)) != int(r) for n, r in final.items())
        plot_rank_heatmap(final, p, initial=initial if changed else None)
        written.append(p)
    if initial or events:
        p = os.path.join(out_dir, "rank_over_time.png")
        plot_rank_over_time(initial, events, p, total_steps=total_steps)
        written.append(p)
    if _has_scores(scores) or _has_scores(_scores_from_events(events)[0]):
        p = os.path.join(out_dir, "score_distribution.png")
        plot_score_distribution(scores or {}, p, events=events)
        written.append(p)
    if ids is not None and len(ids) > 0:
        p = os.path.join(out_dir, "intrinsic_dimensions.png")
        plot_intrinsic_dimensions(ids, p, block_ranks=block_ranks)
        written.append(p)
    return written
