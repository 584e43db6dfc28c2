"""Rank patterns as data: module names split into (block, type), rank grids, rank timelines, and
the text table of ``elalora inspect`` / ``elalora plan``. No matplotlib here.

Imports: numpy and :mod:`elalora.targets` (the block-index rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..targets import matches_suffix, split_block_name

__all__ = ["split_module_name", "rank_matrix", "rank_timeline", "format_rank_table"]


# ---------------------------------------------------------------------------------------------
# Module names
# ---------------------------------------------------------------------------------------------


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
    _, layer, mtype = split_block_name(name)
    return layer, mtype


def module_keys(names: Iterable[str]) -> dict[str, tuple[int | None, str]]:
    """Map each module name to (layer, type label) for grouping.

    Usually the label is the module type of :func:`split_module_name`.  In encoder-decoder
    models (BART/T5: "model.encoder.layers.0.self_attn.q_proj" and
    "model.decoder.layers.0.self_attn.q_proj") the same (layer, type) occurs under several
    prefixes; the type label is then qualified with the last component of the prefix
    ("encoder.self_attn.q_proj"), or with the whole prefix if that is still ambiguous.
    """
    names = list(names)
    parts = {n: split_block_name(n) for n in names}
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
            if not any(o != t and matches_suffix(o, cand) for o in types):
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
    keys = module_keys(pattern)
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


def unlayered(pattern: Mapping[str, int]) -> dict[str, int]:
    return {n: int(r) for n, r in pattern.items() if split_module_name(n)[0] is None}


# ---------------------------------------------------------------------------------------------
# Rank history
# ---------------------------------------------------------------------------------------------


def sorted_events(events: Sequence[Mapping] | None) -> list[Mapping]:
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
    events = sorted_events(events)
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


def final_pattern(initial: Mapping[str, int], events: Sequence[Mapping]) -> dict[str, int]:
    _, ranks = rank_timeline(initial, events)
    return {n: r[-1] for n, r in ranks.items()}


# ---------------------------------------------------------------------------------------------
# matplotlib helpers
# ---------------------------------------------------------------------------------------------


def unlayered_note(pattern: Mapping[str, int], limit: int = 4) -> str | None:
    other = unlayered(pattern)
    if not other:
        return None
    items = [f"{n}: {r}" for n, r in list(other.items())[:limit]]
    more = f", +{len(other) - limit} more" if len(other) > limit else ""
    return (
        f"not in the grid: {len(other)} module(s) without a layer index "
        f"(rank {sum(other.values())} in total) \u2014 " + ", ".join(items) + more
    )


# ---------------------------------------------------------------------------------------------


# Text table
# ---------------------------------------------------------------------------------------------


# Over 80 lines: one text table (column widths, per-layer rows, totals, optional capacity and
# parameter columns) built in order; the column layout is shared by every row.
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
    keys = module_keys(pattern)
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
        s = fmt_int(v)
        if cap_mat is not None and not np.isnan(cap_mat[i, j]):
            s += "/" + fmt_int(cap_mat[i, j])
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

    other = unlayered(pattern)
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


def fmt_int(x: float) -> str:
    return str(int(round(x)))
