"""Every figure of a run directory at once (``elalora train`` and ``elalora plot``).

Imports: :mod:`.figures`, :mod:`.scores`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .figures import plot_rank_heatmap, plot_rank_over_time
from .layout import final_pattern
from .scores import has_scores, plot_intrinsic_dimensions, plot_score_distribution, scores_from_events

__all__ = ["write_all_figures"]


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
        final = final_pattern(initial, events)
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
    if has_scores(scores) or has_scores(scores_from_events(events)[0]):
        p = os.path.join(out_dir, "score_distribution.png")
        plot_score_distribution(scores or {}, p, events=events)
        written.append(p)
    if ids is not None and len(ids) > 0:
        p = os.path.join(out_dir, "intrinsic_dimensions.png")
        plot_intrinsic_dimensions(ids, p, block_ranks=block_ranks)
        written.append(p)
    return written
