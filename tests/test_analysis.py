"""The layer-contribution study (elalora.recipe.analysis): selection rules pinned on hand-made rank
patterns, the drop arithmetic on a metric whose value is known for every switch setting, and that a
switched-off adapter really gives the base model's output."""

from __future__ import annotations

import pytest
import torch

import elalora
from elalora.recipe.analysis import adapter_switches, adapters_off, choose_modules, layer_contribution

from conftest import tiny_bert

RANKS = {"a": 5, "b": 3, "c": 3, "d": 0, "e": 1}


def test_top_and_bottom_follow_the_ranks_and_count_tie_breaks():
    assert choose_modules(RANKS, 1, "top", seed=0) == (["a"], 0)
    assert choose_modules(RANKS, 1, "bottom", seed=0) == (["d"], 0)
    assert choose_modules(RANKS, 2, "bottom", seed=0) == (["d", "e"], 0)
    top2, tied = choose_modules(RANKS, 2, "top", seed=0)
    assert top2[0] == "a" and top2[1] in ("b", "c") and tied == 1  # b and c tie at the cut
    top3, tied = choose_modules(RANKS, 3, "top", seed=0)
    assert top3 == ["a", "b", "c"] and tied == 0  # the whole tie is inside: no tie-break needed
    # the tie-break is seeded: the same seed gives the same choice
    assert choose_modules(RANKS, 2, "top", seed=7) == choose_modules(RANKS, 2, "top", seed=7)


def test_uniform_ranks_give_disjoint_top_and_bottom_and_seeded_random_draws():
    ranks = {f"m{i}": 8 for i in range(10)}
    top, t1 = choose_modules(ranks, 3, "top", seed=1)
    bottom, t2 = choose_modules(ranks, 3, "bottom", seed=1)
    assert not set(top) & set(bottom) and t1 == t2 == 3
    r0, _ = choose_modules(ranks, 3, "random", seed=1, draw=0)
    assert r0 == choose_modules(ranks, 3, "random", seed=1, draw=0)[0]
    draws = {tuple(choose_modules(ranks, 3, "random", seed=1, draw=d)[0]) for d in range(5)}
    assert len(draws) > 1
    with pytest.raises(ValueError):
        choose_modules(ranks, 11, "top", seed=0)


def _uneven_model(form="svd"):
    model = tiny_bert(layers=2)
    names = [n for n, m in model.named_modules() if n.endswith(("query", "value"))]
    pattern = dict(zip(names, [4, 1, 2, 0]))
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, target_modules=["query", "value"], max_rank=4, min_rank=0,
                                                       rank_pattern=pattern, total_steps=10, form=form))
    assert {a.kind for a in h.adapters} == {form}
    for a in h.adapters:  # non-zero updates, so that switching an adapter off changes the output
        for p in a.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.5)
    return model, h, pattern


def test_drops_are_exact_for_a_metric_that_counts_the_enabled_rank():
    model, h, pattern = _uneven_model()
    assert h.rank_pattern() == pattern

    def evaluate(m):  # "metric" = total rank whose adapter is on: each drop = the rank switched off
        sw = adapter_switches(m)
        return {"score": float(sum(s.rank for s in sw.values() if s.is_enabled()))}

    res = layer_contribution(model, evaluate, "score", fractions=(0.25, 0.5), random_draws=2, seed=3)
    assert res.baseline == {"score": 7.0} and res.n_matrices == 4 and res.total_rank == 7
    by = {(a.group, a.fraction, a.draw): a for a in res.ablations}
    assert by[("top", 0.25, 0)].drop == 4.0 and by[("bottom", 0.25, 0)].drop == 0.0
    assert by[("top", 0.5, 0)].drop == 6.0 and by[("bottom", 0.5, 0)].drop == 1.0
    for a in res.ablations:
        assert a.drop == sum(a.ranks) and a.k == len(a.modules)
    assert len(res.ablations) == 2 * (2 + 2)
    assert all(not a.disabled for a in h.adapters)  # everything back on
    rows = {(r["group"], r["fraction"]): r for r in res.summary()}
    assert rows[("top", 0.5)]["drop_mean"] == 6.0 and rows[("random", 0.5)]["draws"] == 2


@pytest.mark.parametrize("form", ["svd", "lora"])
def test_switched_off_adapters_give_the_base_output(form):
    model, h, pattern = _uneven_model(form)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = model(input_ids=ids).logits
        sw = adapter_switches(model)
        assert {n: s.rank for n, s in sw.items()} == pattern
        one = max(pattern, key=pattern.get)  # one adapter off: neither the full nor the base output
        with adapters_off(sw, [one]):
            part = model(input_ids=ids).logits
        with adapters_off(sw, list(sw)):
            off = model(input_ids=ids).logits
        h.set_adapters_enabled(False)
        base = model(input_ids=ids).logits
        h.set_adapters_enabled(True)
        again = model(input_ids=ids).logits
    assert torch.equal(off, base) and torch.equal(again, on) and not torch.equal(on, base)
    assert not torch.equal(part, on) and not torch.equal(part, base)


def test_ranks_from_another_run_choose_the_sets_and_must_name_the_same_matrices():
    model, h, pattern = _uneven_model()
    names = sorted(pattern)
    other = {n: r for n, r in zip(names, [0, 9, 1, 5])}  # another run's order: names[1] top, names[0] bottom

    def evaluate(m):
        sw = adapter_switches(m)
        return {"score": float(sum(s.rank for s in sw.values() if s.is_enabled()))}

    res = layer_contribution(model, evaluate, "score", fractions=(0.25,), random_draws=0, seed=0, ranks=other)
    top, bottom = res.ablations
    assert top.modules == [names[1]] and bottom.modules == [names[0]]
    assert top.ranks == [9] and bottom.ranks == [0]  # the ranks that chose them are recorded
    assert top.drop == pattern[names[1]] and bottom.drop == pattern[names[0]]  # the model's own adapters went off
    from elalora.errors import RunError

    with pytest.raises(RunError, match="does not name the model's adapted matrices"):
        layer_contribution(model, evaluate, "score", ranks={**other, "not.a.matrix": 3})
