"""Figures and tables that show where the ranks went: rank heatmaps, rank over time, score
distributions, GeLoRA intrinsic dimensions, the layer-contribution study, and the text rank table.

:mod:`.layout` turns rank patterns and histories into grids and tables (numpy only);
:mod:`.figures` draws them (matplotlib, ``pip install 'elalora[plots]'``, imported lazily).

Imports: :mod:`elalora.targets`, :mod:`elalora._extras`, numpy, matplotlib (lazily).
"""

from __future__ import annotations

from .contribution import plot_layer_contribution
from .figures import plot_rank_heatmap, plot_rank_over_time
from .report import write_all_figures
from .scores import plot_intrinsic_dimensions, plot_score_distribution
from .layout import format_rank_table, rank_matrix, rank_timeline, split_module_name

__all__ = ["split_module_name", "rank_matrix", "plot_rank_heatmap", "rank_timeline", "plot_rank_over_time",
           "plot_score_distribution", "plot_intrinsic_dimensions", "format_rank_table", "write_all_figures",
           "plot_layer_contribution"]
