"""Tests for the GeLoRA planner (Ed-dib et al., arXiv:2412.09250) and its TwoNN estimator."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from elalora.allocation.gelora import (
    GeLoRAPlan,
    block_index_of,
    collect_block_states,
    gelora_block_ranks,
    gelora_rank_pattern,
    intrinsic_dimensions,
    plan_gelora,
    rescale_ranks,
    twonn_dimension,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tolerances import assert_close  # noqa: E402


# ------------------------------------------------------------------------------------------
# synthetic data of known intrinsic dimension
# ------------------------------------------------------------------------------------------

def _random_frame(rng: np.random.Generator, ambient: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((ambient, d)))
    return q  # (ambient, d), orthonormal columns


def gaussian_subspace(d: int, n: int = 2000, ambient: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ _random_frame(rng, ambient, d).T


def uniform_cube(d: int, n: int = 2000, ambient: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, d)) @ _random_frame(rng, ambient, d).T


def sphere_s2(n: int = 2000, ambient: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ _random_frame(rng, ambient, 3).T  # S^2 rotated into R^20


def reference_twonn(x: np.ndarray, discard_fraction: float = 0.1) -> float:
    """Slow, straightforward TwoNN (independent of the library: KD-tree, explicit loop)."""
    x = np.unique(np.asarray(x, dtype=np.float64), axis=0)
    n = len(x)
    tree = cKDTree(x)
    mu = np.empty(n)
    for i in range(n):
        dist, _ = tree.query(x[i], k=3)  # itself, 1st and 2nd neighbour
        mu[i] = dist[2] / dist[1]
    mu.sort()
    keep = int(math.floor(n * (1 - discard_fraction) + 1e-9))
    num = 0.0
    den = 0.0
    for k in range(1, keep + 1):
        xk = math.log(mu[k - 1])
        yk = -math.log(1.0 - k / n)
        num += xk * yk
        den += xk * xk
    return num / den


# Measured with these generators, seed 0, N = 2000 (for the record): Gaussian on a d-subspace of
# R^64: d=2: 1.982, d=5: 5.101, d=10: 9.576; uniform cube: d=2: 1.991, d=5: 4.723, d=10: 8.201;
# S^2 rotated into R^20: 1.973.
@pytest.mark.parametrize("d", [2, 5, 10])
def test_twonn_gaussian_subspace_known_dimension(d):
    est = twonn_dimension(gaussian_subspace(d))
    assert abs(est - d) <= 0.1 * d, est


@pytest.mark.parametrize("d", [2, 5])
def test_twonn_uniform_cube_known_dimension(d):
    est = twonn_dimension(uniform_cube(d))
    assert abs(est - d) <= 0.1 * d, est


def test_twonn_cube_high_dimension_is_biased_low():
    # Honest record: boundary effects make TwoNN underestimate a 10-D cube with 2000 points
    # (≈ 8.2); the test pins that it is low but in the right range, not that it is within 10 %.
    est = twonn_dimension(uniform_cube(10))
    assert 7.0 < est < 10.0, est


def test_twonn_sphere():
    est = twonn_dimension(sphere_s2())
    assert abs(est - 2.0) <= 0.2, est


@pytest.mark.parametrize(
    "data",
    [
        gaussian_subspace(5, n=600, seed=3),
        uniform_cube(3, n=500, ambient=16, seed=4),
        sphere_s2(n=400, seed=5),
        np.random.default_rng(6).standard_normal((300, 7)) * np.array([10, 5, 1, 1, 0.1, 0.1, 0.01]) + 100.0,
    ],
)
def test_twonn_matches_independent_reference(data):
    assert twonn_dimension(data) == pytest.approx(reference_twonn(data), abs=1e-8, rel=1e-8)


def test_twonn_reference_other_discard_and_torch_input():
    x = gaussian_subspace(4, n=500, ambient=32, seed=7)
    for frac in (0.05, 0.2):
        assert twonn_dimension(x, discard_fraction=frac) == pytest.approx(reference_twonn(x, frac), abs=1e-8)
    # discard_fraction = 0: the point with F = 1 is left out, so the estimate stays finite
    assert math.isfinite(twonn_dimension(x, discard_fraction=0.0))
    xt = torch.tensor(x, dtype=torch.float32)
    ref = reference_twonn(xt.double().numpy())
    assert twonn_dimension(xt) == pytest.approx(ref, abs=1e-8)


def test_twonn_drops_duplicates():
    x = gaussian_subspace(3, n=400, seed=8)
    dup = np.concatenate([x, x[:150], x[:10]], axis=0)
    assert twonn_dimension(dup) == pytest.approx(twonn_dimension(x), abs=1e-12)
    assert twonn_dimension(dup) == pytest.approx(reference_twonn(dup), abs=1e-8)


def test_twonn_errors():
    with pytest.raises(ValueError, match="at least 3"):
        twonn_dimension(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="distinct"):
        twonn_dimension(np.ones((50, 4)))
    with pytest.raises(ValueError, match="distinct"):
        twonn_dimension(np.array([[0.0, 1.0]] * 20 + [[1.0, 0.0]] * 20))
    with pytest.raises(ValueError, match="NaN"):
        twonn_dimension(np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        twonn_dimension(np.zeros(10))
    with pytest.raises(ValueError, match="discard_fraction"):
        twonn_dimension(np.random.default_rng(0).random((10, 2)), discard_fraction=1.0)


def test_intrinsic_dimensions_names_failing_state():
    good = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    ids = intrinsic_dimensions([good, good * 2.0])
    assert ids[0] == pytest.approx(ids[1], abs=1e-9)  # scale invariant
    with pytest.raises(ValueError, match="H_0"):
        intrinsic_dimensions([torch.ones(100, 4), good])


# ------------------------------------------------------------------------------------------
# rank rule, rescaling, names
# ------------------------------------------------------------------------------------------

def test_block_ranks_by_hand():
    ids = [10.0, 14.2, 13.0, 20.5]  # differences 4.2, -1.2, 7.5
    assert gelora_block_ranks(ids) == [6, 1, 9]  # ceil: 5+1, 0+1, 8+1
    assert gelora_block_ranks(ids, rounding="ceil") == [6, 1, 9]
    assert gelora_block_ranks(ids, rounding="round") == [5, 1, 9]  # 4+1, 0+1, 8+1 (half up)
    assert gelora_block_ranks(ids, rounding="floor") == [5, 1, 8]
    assert gelora_block_ranks([3.0, 5.0, 5.0]) == [3, 1]  # exact integer differences stay
    assert gelora_block_ranks([0.1, 0.3]) == [2]  # 0.19999999999999998 → 1, +1
    assert gelora_block_ranks([2.0, 2.0 + 3.0 + 1e-12]) == [4]  # float noise does not add a rank
    with pytest.raises(ValueError):
        gelora_block_ranks([1.0])
    with pytest.raises(ValueError):
        gelora_block_ranks([1.0, 2.0], rounding="banker")


def test_rescale_by_hand():
    assert rescale_ranks([6, 1, 9], 32) == [12, 2, 18]
    # shares 3.75, 0.625 → clamped to 1, then 9·6/15 = 3.6 and 9·9/15 = 5.4; floors 3,1,5 (9);
    # one left goes to the largest remainder (0.6) → [4, 1, 5]
    assert rescale_ranks([6, 1, 9], 10) == [4, 1, 5]
    assert rescale_ranks([6, 1, 9], 3) == [1, 1, 1]
    assert rescale_ranks([2, 2, 2], 7) == [3, 2, 2]  # tie → earlier entry
    assert rescale_ranks([5, 1], 4, minimum=2) == [2, 2]
    with pytest.raises(ValueError):
        rescale_ranks([6, 1, 9], 2)
    with pytest.raises(ValueError):
        rescale_ranks([], 5)
    with pytest.raises(ValueError):
        rescale_ranks([0, 0], 5)


def test_rescale_properties_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        ranks = [int(v) for v in rng.integers(1, 40, size=n)]
        minimum = int(rng.integers(0, 4))
        target = int(rng.integers(minimum * n, 60 * n + 1))
        out = rescale_ranks(ranks, target, minimum=minimum)
        assert sum(out) == target
        assert all(isinstance(v, int) and v >= minimum for v in out)
        for i in range(n):
            for j in range(n):
                if ranks[i] > ranks[j]:
                    assert out[i] >= out[j]
        if minimum * n < target and all(r * target / sum(ranks) >= minimum for r in ranks):
            shares = [r * target / sum(ranks) for r in ranks]
            assert all(abs(o - s) < 1.0 for o, s in zip(out, shares))


def test_block_index_of():
    assert block_index_of("bert.encoder.layer.3.attention.self.query") == 3
    assert block_index_of("model.layers.11.mlp.up_proj") == 11
    assert block_index_of("transformer.h.2.attn.c_attn") == 2
    assert block_index_of("vit.encoder.layer.0.attention.attention.query") == 0
    assert block_index_of("layers.7.self_attn.q_proj") == 7
    assert block_index_of("encoder.block.3.layer.1.DenseReluDense.wi") == 3
    assert block_index_of("classifier") is None
    assert block_index_of("bert.pooler.dense") is None
    assert block_index_of("lm_head") is None
    assert block_index_of("model.hidden.3.x") is None


def test_rank_pattern():
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
             "bert.encoder.layer.1.output.dense", "bert.encoder.layer.2.intermediate.dense", "classifier"]
    ranks, alphas = gelora_rank_pattern(names, [6, 1, 9])
    assert ranks == {names[0]: 6, names[1]: 6, names[2]: 1, names[3]: 9, "classifier": 6}
    assert alphas == {k: 32.0 * v for k, v in ranks.items()}
    _, alphas16 = gelora_rank_pattern(names, [6, 1, 9], alpha_scale=16)
    assert alphas16[names[2]] == 16.0
    with pytest.raises(ValueError, match="block 3"):
        gelora_rank_pattern(["model.layers.3.mlp.up_proj"], [1, 2, 3])


# ------------------------------------------------------------------------------------------
# hidden states on tiny models
# ------------------------------------------------------------------------------------------

BERT_CFG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37, vocab_size=100)
LLAMA_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=100)


def _bert(cls=BertModel, **kw):
    torch.manual_seed(0)
    return cls(BertConfig(**BERT_CFG, **kw))


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_CFG))


def _padded_batches(n, *, seq=10, bs=32, seed=1, first_token=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, bs):
        b = min(bs, n - i)
        ids = torch.randint(1, 100, (b, seq), generator=g)
        if first_token is not None:
            ids[:, 0] = first_token
        lens = torch.randint(3, seq + 1, (b,), generator=g)
        mask = (torch.arange(seq)[None] < lens[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.mark.parametrize("factory", [lambda: _bert(BertModel), lambda: _bert(BertForSequenceClassification), _llama],
                         ids=["BertModel", "BertForSequenceClassification", "LlamaForCausalLM"])
def test_collect_shapes_and_padding_invariance(factory):
    model = factory()
    model.train()  # collect_block_states must switch to eval (dropout off) and restore the mode
    batches = _padded_batches(40, bs=16)
    L = model.config.num_hidden_layers
    for pooling in ("mean", "cls", "last"):
        states = collect_block_states(model, batches, pooling=pooling)
        assert len(states) == L + 1
        assert all(s.shape == (40, 32) and s.dtype == torch.float32 for s in states)
    assert model.training

    # padding changes nothing: each example run alone without padding gives the same vectors
    for pooling in ("mean", "last"):
        states = collect_block_states(model, batches[:1], pooling=pooling)
        b = batches[0]
        for i in range(4):
            n_tok = int(b["attention_mask"][i].sum())
            single = [{"input_ids": b["input_ids"][i:i + 1, :n_tok],
                       "attention_mask": torch.ones(1, n_tok, dtype=torch.long)}]
            alone = collect_block_states(model, single, pooling=pooling)
            for s_pad, s_one in zip(states, alone):
                assert_close(s_pad[i], s_one[0])


def test_pooling_definitions_bert():
    model = _bert().eval()
    b = _padded_batches(8, bs=8)[0]
    with torch.no_grad():
        hs = model(**b, output_hidden_states=True).hidden_states
    m = b["attention_mask"].float()
    mean = collect_block_states(model, [b], pooling="mean")
    cls = collect_block_states(model, [b], pooling="cls")
    last = collect_block_states(model, [b], pooling="last")
    lens = b["attention_mask"].sum(1)
    for j, h in enumerate(hs):
        assert_close(mean[j], (h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        assert_close(cls[j], h[:, 0])
        assert_close(last[j], h[torch.arange(8), lens - 1])
    # without an attention mask, mean is over all tokens
    nomask = collect_block_states(model, [{"input_ids": b["input_ids"]}], pooling="mean")
    with torch.no_grad():
        hs2 = model(input_ids=b["input_ids"], output_hidden_states=True).hidden_states
    assert_close(nomask[1], hs2[1].mean(1))


def test_last_pooling_left_padding():
    model = _llama().eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    last = collect_block_states(model, [{"input_ids": ids, "attention_mask": mask}], pooling="last")
    assert_close(last[2], hs[2][:, -1])


def test_collect_errors():
    model = _bert()
    with pytest.raises(ValueError, match="pooling"):
        collect_block_states(model, _padded_batches(4), pooling="max")
    with pytest.raises(ValueError, match="empty"):
        collect_block_states(model, [])


# ------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------

def _encoder_linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder.layer." in n]


def test_plan_gelora_end_to_end_bert():
    model = _bert()
    names = _encoder_linear_names(model)
    assert len(names) == 3 * 6
    plan = plan_gelora(model, _padded_batches(300, seq=12, bs=50), names)
    assert isinstance(plan, GeLoRAPlan)
    assert plan.n_samples == 300 and plan.pooling == "mean" and plan.target_total is None
    assert len(plan.intrinsic_dims) == 4 and all(d > 0 for d in plan.intrinsic_dims)
    assert plan.block_ranks == gelora_block_ranks(plan.intrinsic_dims)
    assert set(plan.rank_pattern) == set(names)
    for n in names:
        assert plan.rank_pattern[n] == plan.block_ranks[block_index_of(n)] >= 1
        assert plan.alpha_pattern[n] == 32.0 * plan.rank_pattern[n]
    d = plan.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["block_ranks"] == plan.block_ranks

    # the same inputs give the same plan (deterministic); a budget gives an exact total
    scaled = plan_gelora(model, _padded_batches(300, seq=12, bs=50), names, target_avg_rank=4)
    assert scaled.intrinsic_dims == plan.intrinsic_dims
    assert scaled.target_total == 4 * len(names)
    assert sum(scaled.rank_pattern.values()) == 4 * len(names)
    assert all(r >= 1 for r in scaled.rank_pattern.values())
    assert scaled.alpha_pattern == {k: 32.0 * v for k, v in scaled.rank_pattern.items()}
    json.dumps(scaled.to_dict())


def test_plan_gelora_classifier_and_labels():
    model = _bert(BertForSequenceClassification, num_labels=2)
    names = _encoder_linear_names(model) + ["classifier"]
    batches = _padded_batches(200, bs=50)
    for b in batches:
        b["labels"] = torch.zeros(b["input_ids"].shape[0], dtype=torch.long)
    plan = plan_gelora(model, batches, names, rounding="round")
    assert plan.rank_pattern["classifier"] == sorted(plan.block_ranks)[(len(plan.block_ranks) - 1) // 2]


def test_plan_gelora_cls_with_constant_first_token_fails_clearly():
    model = _bert()
    with pytest.raises(ValueError, match="H_0.*pooling='mean'"):
        plan_gelora(model, _padded_batches(100, first_token=2), _encoder_linear_names(model), pooling="cls")


def test_plan_gelora_llama():
    model = _llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    plan = plan_gelora(model, _padded_batches(200, bs=50), names, pooling="last", target_avg_rank=2.5)
    assert len(plan.intrinsic_dims) == 3 and len(plan.block_ranks) == 2
    assert sum(plan.rank_pattern.values()) == round(2.5 * len(names))
