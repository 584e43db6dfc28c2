"""Figures of scores: the importance-score distribution and GeLoRA's intrinsic dimensions.

Imports: numpy, :mod:`.figures` (the drawing helpers), :mod:`.layout`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .figures import pyplot, save_figure
from .layout import fmt_int, module_keys, sorted_events

__all__ = ["plot_score_distribution", "plot_intrinsic_dimensions", "has_scores", "scores_from_events"]


def scores_from_events(events: Sequence[Mapping] | None) -> tuple[dict[str, list[float]], int | None]:
    last: dict[str, list[float]] = {}
    step = None
    for ev in sorted_events(events):
        sc = ev.get("scores")
        if sc is not None and len(sc):
            last[ev["module"]] = [float(v) for v in sc]
            step = int(ev["step"])
    return last, step


def has_scores(scores: Mapping[str, Sequence[float]] | None) -> bool:
    return bool(scores) and any(v is not None and len(v) for v in scores.values())


# Over 80 lines: one two-panel figure (histogram, per-type box plot) drawn on shared axes and a
# shared scale decision; split up, the helpers would pass the same state around.
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
    if not has_scores(scores):
        scores, step = scores_from_events(events)
        source = f"importance scores from each module's last round (latest step {step})"
    if not has_scores(scores):
        raise ValueError("plot_score_distribution: no scores (neither given nor in the events)")
    plt = pyplot()

    keys = module_keys(scores)
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
        save_figure(fig, path)
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
    plt = pyplot()
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
                axb.bar_label(bars, labels=[fmt_int(v) for v in br], fontsize=7, padding=1.5)
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
        save_figure(fig, path)
    except BaseException:
        plt.close(fig)
        raise
