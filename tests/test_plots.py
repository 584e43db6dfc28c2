"""Tests for elalora.plots: rank figures and tables."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from elalora import plots as P

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BERT_TYPES = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
LLAMA_TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def bert_pattern(n_layers: int = 6, rank: int = 8) -> dict[str, int]:
    return {f"bert.encoder.layer.{i}.{t}": rank for i in range(n_layers) for t in BERT_TYPES}


def llama_pattern(n_layers: int = 32, rank: int = 8) -> dict[str, int]:
    return {f"model.layers.{i}.{t}": rank for i in range(n_layers) for t in LLAMA_TYPES}


def constant_budget_events(initial, *, rounds=8, moves=5, start=100, every=50, seed=0):
    """Each move takes one rank from a module and gives it to another, so the total stays."""
    rng = random.Random(seed)
    cur = dict(initial)
    names = list(initial)
    events = []
    for k in range(rounds):
        step = start + k * every
        for _ in range(moves):
            a, b = rng.sample(names, 2)
            if cur[b] <= 1:
                continue
            events.append({"step": step, "module": a, "old_rank": cur[a], "new_rank": cur[a] + 1,
                           "scores": [rng.lognormvariate(-5, 2) for _ in range(cur[a])]})
            cur[a] += 1
            events.append({"step": step, "module": b, "old_rank": cur[b], "new_rank": cur[b] - 1,
                           "scores": [rng.lognormvariate(-5, 2) for _ in range(cur[b])]})
            cur[b] -= 1
    return events, cur


def assert_png(path, min_w=200, min_h=150):
    import matplotlib.image as mpimg

    data = open(path, "rb").read()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    assert w <= 4000 and h <= 4000, (w, h)
    # Not a blank canvas.
    assert float(np.asarray(img[..., :3]).std()) > 0.01


# --------------------------------------------------------------------------------------------
# Pure data helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bert.encoder.layer.3.attention.output.dense", (3, "attention.output.dense")),
        ("bert.encoder.layer.0.attention.self.query", (0, "attention.self.query")),
        ("model.layers.11.mlp.up_proj", (11, "mlp.up_proj")),
        ("model.layers.0.self_attn.q_proj", (0, "self_attn.q_proj")),
        ("transformer.h.2.attn.c_attn", (2, "attn.c_attn")),
        ("transformer.h.10.mlp.c_proj", (10, "mlp.c_proj")),
        ("vit.encoder.layer.7.attention.attention.query", (7, "attention.attention.query")),
        ("encoder.block.4.layer.0.SelfAttention.q", (4, "layer.0.SelfAttention.q")),
        ("base_model.model.model.layers.5.self_attn.v_proj", (5, "self_attn.v_proj")),
        ("layers.3.mlp.down_proj", (3, "mlp.down_proj")),
        ("classifier", (None, "classifier")),
        ("bert.pooler.dense", (None, "bert.pooler.dense")),
    ],
)
def test_split_module_name(name, expected):
    assert P.split_module_name(name) == expected


def test_rank_matrix_shape_and_order():
    pat = bert_pattern(6)
    pat["bert.encoder.layer.2.attention.self.query"] = 13
    mat, layers, types = P.rank_matrix(pat)
    assert mat.shape == (6, 6)
    assert layers == list(range(6))
    assert types == BERT_TYPES  # first-seen order
    assert mat[2, 0] == 13
    assert np.nansum(mat) == sum(pat.values())

    mat, layers, types = P.rank_matrix(llama_pattern(32))
    assert mat.shape == (32, 7)
    assert types == LLAMA_TYPES


def test_rank_matrix_nan_and_unlayered():
    pat = {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.mlp.up_proj": 6,
        "model.layers.3.self_attn.q_proj": 2,  # layer 3 has no up_proj
        "lm_head": 8,  # no layer index: not in the grid
    }
    mat, layers, types = P.rank_matrix(pat)
    assert layers == [0, 3]
    assert types == ["self_attn.q_proj", "mlp.up_proj"]
    assert mat.shape == (2, 2)
    assert mat[0, 0] == 4 and mat[0, 1] == 6 and mat[1, 0] == 2
    assert math.isnan(mat[1, 1])

    mat, layers, types = P.rank_matrix({})
    assert mat.shape == (0, 0) and layers == [] and types == []


def test_rank_matrix_encoder_decoder_types_do_not_collide():
    pat = {
        "model.encoder.layers.0.self_attn.q_proj": 4,
        "model.decoder.layers.0.self_attn.q_proj": 6,
    }
    mat, layers, types = P.rank_matrix(pat)
    assert layers == [0]
    assert types == ["encoder.self_attn.q_proj", "decoder.self_attn.q_proj"]
    assert list(mat[0]) == [4, 6]


def test_rank_timeline_reconstructs_final_and_keeps_total():
    initial = bert_pattern(6)
    events, final = constant_budget_events(initial, rounds=8, moves=5)
    steps, ranks = P.rank_timeline(initial, events)
    rounds = sorted({e["step"] for e in events})
    assert steps == [0] + rounds
    assert set(ranks) == set(initial)
    assert all(len(v) == len(steps) for v in ranks.values())
    assert {n: v[0] for n, v in ranks.items()} == initial
    assert {n: v[-1] for n, v in ranks.items()} == final
    totals = [sum(v[k] for v in ranks.values()) for k in range(len(steps))]
    assert totals == [sum(initial.values())] * len(steps)


def test_rank_timeline_without_events_and_with_new_module():
    initial = {"model.layers.0.mlp.up_proj": 4}
    steps, ranks = P.rank_timeline(initial, [])
    assert steps == [0] and ranks == {"model.layers.0.mlp.up_proj": [4]}

    events = [
        {"step": 10, "module": "model.layers.1.mlp.up_proj", "old_rank": 2, "new_rank": 3, "scores": []},
        {"step": 10, "module": "model.layers.0.mlp.up_proj", "old_rank": 4, "new_rank": 3, "scores": []},
    ]
    steps, ranks = P.rank_timeline(initial, events)
    assert steps == [0, 10]
    assert ranks["model.layers.1.mlp.up_proj"] == [2, 3]
    assert ranks["model.layers.0.mlp.up_proj"] == [4, 3]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["bert", "llama"])
def run(request):
    initial = bert_pattern(6) if request.param == "bert" else llama_pattern(32)
    events, final = constant_budget_events(initial, rounds=6, moves=6 if request.param == "bert" else 30)
    return request.param, initial, events, final


def test_plot_rank_heatmap(tmp_path, run):
    kind, initial, events, final = run
    if kind == "bert":
        p = tmp_path / "heat.png"
        P.plot_rank_heatmap(final, p)
        assert_png(p)
    p2 = tmp_path / "sub" / "heat_diff.png"
    P.plot_rank_heatmap(final, p2, initial=initial, title="ranks")
    assert_png(p2)


def test_plot_rank_heatmap_with_unlayered_and_missing_cells(tmp_path):
    pat = {"model.layers.0.self_attn.q_proj": 4, "model.layers.2.mlp.up_proj": 6, "lm_head": 8}
    p = tmp_path / "h.png"
    P.plot_rank_heatmap(pat, p, initial={n: 5 for n in pat})
    assert_png(p, min_h=100)
    # Only modules without a layer index: drawn as a single row.
    p = tmp_path / "h2.png"
    P.plot_rank_heatmap({"classifier": 4, "pooler": 2}, p)
    assert_png(p, min_h=100)
    with pytest.raises(ValueError):
        P.plot_rank_heatmap({}, tmp_path / "none.png")


def test_plot_rank_over_time(tmp_path, run):
    kind, initial, events, final = run
    p = tmp_path / "time.png"
    P.plot_rank_over_time(initial, events, p, total_steps=1000)
    assert_png(p)
    if kind == "llama":  # 32 layers: colour bar instead of a legend
        p = tmp_path / "time_layer.png"
        P.plot_rank_over_time(initial, events, p, group_by="layer")
        assert_png(p)
    else:  # plain LoRA: flat lines
        p = tmp_path / "flat.png"
        P.plot_rank_over_time(initial, [], p, total_steps=500)
        assert_png(p)
    with pytest.raises(ValueError):
        P.plot_rank_over_time(initial, events, tmp_path / "x.png", group_by="module")


def test_plot_score_distribution(tmp_path, run):
    kind, initial, events, final = run
    rng = np.random.default_rng(0)
    scores = {n: list(rng.lognormal(-6, 2.5, size=r)) for n, r in final.items()}
    scores[next(iter(scores))][:2] = [0.0, 0.0]  # zeros on a log axis
    p = tmp_path / "scores.png"
    P.plot_score_distribution(scores, p)
    assert_png(p)
    if kind == "llama":
        return
    # Linear range.
    p = tmp_path / "scores_lin.png"
    P.plot_score_distribution({n: list(rng.uniform(0.5, 1.0, size=r)) for n, r in final.items()}, p)
    assert_png(p)
    # Empty scores: taken from the events.
    p = tmp_path / "scores_ev.png"
    P.plot_score_distribution({}, p, events=events)
    assert_png(p)
    with pytest.raises(ValueError):
        P.plot_score_distribution({}, tmp_path / "none.png", events=[])


def test_plot_intrinsic_dimensions(tmp_path):
    ids = [3.0, 8.5, 12.0, 15.2, 14.8, 18.0, 20.1]
    p = tmp_path / "ids.png"
    P.plot_intrinsic_dimensions(ids, p, block_ranks=[5, 4, 3, 0, 3, 2])
    assert_png(p)
    p = tmp_path / "ids_only.png"
    P.plot_intrinsic_dimensions(list(np.linspace(2, 40, 33)), p)
    assert_png(p)
    with pytest.raises(ValueError):
        P.plot_intrinsic_dimensions([], tmp_path / "none.png")


def test_figures_are_closed(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    P.plot_rank_heatmap(bert_pattern(2), tmp_path / "a.png")
    P.plot_rank_over_time(bert_pattern(2), [], tmp_path / "b.png")
    assert len(plt.get_fignums()) == before


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def test_format_rank_table_numbers_and_totals():
    pat = {f"model.layers.{i}.{t}": 8 for i in range(2) for t in ("self_attn.q_proj", "self_attn.v_proj")}
    pat["model.layers.1.self_attn.v_proj"] = 13
    pat["model.layers.0.self_attn.q_proj"] = 3
    pat["lm_head"] = 4
    text = P.format_rank_table(pat, params={n: 1000 * r for n, r in pat.items()})
    lines = text.splitlines()
    header = lines[0]
    assert "layer" in header and "q_proj" in header and "v_proj" in header
    row0 = next(line for line in lines if line.strip().startswith("0 |"))
    row1 = next(line for line in lines if line.strip().startswith("1 |"))
    assert row0.split("|")[1].split() == ["3", "8", "11"]
    assert row1.split("|")[1].split() == ["8", "13", "21"]
    total_row = next(line for line in lines if line.startswith("total |"))
    assert total_row.split("|")[1].split() == ["11", "21", "32"]
    assert "lm_head" in text  # unlayered module listed below the grid
    total = sum(pat.values())  # 36
    assert f"total rank: {total}" in text
    assert f"mean rank: {total / len(pat):.2f}" in text
    assert "min rank: 3 (model.layers.0.self_attn.q_proj)" in text
    assert "max rank: 13 (model.layers.1.self_attn.v_proj)" in text
    assert "modules: 5" in text
    assert f"trainable parameters: {1000 * total:,}" in text


def test_format_rank_table_capacity_and_missing():
    pat = {"bert.encoder.layer.0.attention.self.query": 9, "bert.encoder.layer.1.output.dense": 7}
    text = P.format_rank_table(pat, capacity={n: 12 for n in pat})
    assert "9/12" in text and "7/12" in text
    assert "capacity: 24 total, 16 in use (66.7%)" in text
    row0 = next(line for line in text.splitlines() if line.strip().startswith("0 |"))
    assert row0.split("|")[1].split() == ["9/12", "-", "9"]
    assert "trainable parameters" not in text


def test_format_rank_table_large_and_empty():
    pat = llama_pattern(32, rank=6)
    text = P.format_rank_table(pat)
    assert f"total rank: {6 * 32 * 7}" in text
    assert sum(1 for line in text.splitlines() if "|" in line and line.split("|")[0].strip().isdigit()) == 32
    assert "total rank: 0" in P.format_rank_table({})


# --------------------------------------------------------------------------------------------
# write_all_figures
# --------------------------------------------------------------------------------------------


def test_write_all_figures_without_events(tmp_path):
    pat = bert_pattern(6)
    paths = P.write_all_figures(str(tmp_path), initial=pat, final=pat, events=[], total_steps=300)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["rank_heatmap.png", "rank_over_time.png"]  # no scores, no IDs: skipped
    for p in paths:
        assert p.startswith(str(tmp_path / "figures"))
        assert_png(p)


def test_write_all_figures_full(tmp_path):
    initial = bert_pattern(6)
    events, final = constant_budget_events(initial, rounds=4, moves=4)
    paths = P.write_all_figures(
        tmp_path, initial=initial, final=None, events=events,
        ids=[2.0, 5.0, 9.0, 11.0, 12.0, 15.0, 16.0], block_ranks=[3, 4, 2, 1, 3, 1],
        total_steps=600,
    )
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["intrinsic_dimensions.png", "rank_heatmap.png", "rank_over_time.png",
                     "score_distribution.png"]
    for p in paths:
        assert_png(p)


def test_write_all_figures_empty(tmp_path):
    assert P.write_all_figures(tmp_path, initial={}, final={}, events=[]) == []
    assert (tmp_path / "figures").is_dir()
