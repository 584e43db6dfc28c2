"""4-bit (NF4) and 8-bit (LLM.int8()) bitsandbytes bases on the CPU (bitsandbytes >= 0.49 runs both).

Skipped when bitsandbytes is not installed (``pip install elalora[bnb]``).
"""

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import elalora  # noqa: E402
from elalora.model import load_adapter  # noqa: E402
from elalora.persistence import merge_and_unload, save_adapter  # noqa: E402
from elalora.quant import (QuantizationError, dequantize_weight, is_quantized_layer,  # noqa: E402
                           keep_standard_4bit_layout, load_quantized_causal_lm)

from conftest import tiny_llama  # noqa: E402
from tolerances import assert_close  # noqa: E402

DIMS = dict(hidden=64, intermediate=128)  # in_features multiples of 64: bnb's CPU inference layout needs them

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=0, **DIMS).save_pretrained(d)
    return str(d)


def _cfg(**kw):
    base = dict(r=2, form="svd", b=1, k=1, tinit=2, tfinal=2, delta_t=2, total_steps=12, seed=1)  # the tests read P, Q
    base.update(kw)
    return elalora.ElaLoRAConfig(**base)


def _train(model, handle, steps=12, lr=1e-2):
    opt = torch.optim.AdamW(handle.adapter_parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 10), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        handle.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _ids(seed=3):
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_are_fp32_with_the_logical_shape(llama_dir, bits):
    model = load_quantized_causal_lm(llama_dir, bits)
    q = model.model.layers[0].mlp.down_proj
    assert is_quantized_layer(q) and not q.weight.dtype.is_floating_point
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    h = elalora.get_model(model, _cfg())
    a = h.adapters[h.names.index("model.layers.0.mlp.down_proj")]
    assert a.quantized and a.base_layer is q
    # down_proj is 128 -> 64: the adapter follows in/out_features, not the packed (4096 x 1) uint8 storage.
    assert (a.in_features, a.out_features) == (128, 64)
    c = a.capacity
    assert a.lora_Q.shape == (c, 128) and a.lora_P.shape == (64, c) and a.lora_Q.dtype == torch.float32
    assert all(p.requires_grad for p in h.adapter_parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        after = model(input_ids=_ids()).logits
    assert torch.equal(before, after)  # ΔW = 0 at initialisation (λ = 0)


def test_4bit_base_trains_like_its_dequantised_float_copy(llama_dir):
    """Linear4bit computes x·dequant(W)ᵀ in its compute dtype (fp32 here): a float model holding the
    dequantised weights is the same function, so the same seeds give the same scores, rounds and
    losses (float tolerance: the two matmuls may block their reductions differently)."""
    qmodel = load_quantized_causal_lm(llama_dir, 4)
    fmodel = tiny_llama(seed=0, **DIMS)
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if is_quantized_layer(mod):
                fmodel.get_submodule(name).weight.copy_(dequantize_weight(mod))
    hq, hf = elalora.get_model(qmodel, _cfg()), elalora.get_model(fmodel, _cfg())
    lq, lf = _train(qmodel, hq), _train(fmodel, hf)
    strip = lambda evs: [(e.step, e.module, e.old_rank, e.new_rank) for e in evs]  # noqa: E731
    assert hq.events and strip(hq.events) == strip(hf.events)
    assert hq.rank_pattern() == hf.rank_pattern()
    torch.testing.assert_close(torch.tensor(lq), torch.tensor(lf), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_peft_export_loads_on_a_freshly_quantised_base(llama_dir, bits, tmp_path):
    from peft import PeftModel

    model = load_quantized_causal_lm(llama_dir, bits)
    h = elalora.get_model(model, _cfg())
    _train(model, h)
    assert h.events
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    h.export_peft(tmp_path / "peft")
    base = load_quantized_causal_lm(llama_dir, bits)
    pm = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    keep_standard_4bit_layout(pm)  # evaluate PEFT's base as ours is evaluated (no CPU inference repacking)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        out = pm(input_ids=_ids()).logits
    # Same quantised weights, same fp32 LoRA factors: only the order of the adapter matmuls differs.
    assert_close(out, ref)


@pytest.mark.parametrize("form", ["svd", "lora"])
def test_merge_and_unload_4bit_returns_float_linear_layers(llama_dir, form):
    model = load_quantized_causal_lm(llama_dir, 4)
    h = elalora.get_model(model, _cfg(form=form))
    assert {a.kind for a in h.adapters} == {form}
    _train(model, h)
    assert h.events  # trained on the 4-bit base, ranks moved
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    a = h.adapters[0]
    expect = dequantize_weight(a.base_layer).float() + a.delta_weight()
    merged = merge_and_unload(h)
    assert merged is model
    lin = merged.get_submodule(h.names[0])
    assert type(lin) is torch.nn.Linear and lin.weight.dtype == torch.float32 and not lin.weight.requires_grad
    assert torch.equal(lin.weight, expect)
    assert not any(isinstance(m, elalora.layers.ElasticAdapter) for m in merged.modules())
    with torch.no_grad():
        out = merged(input_ids=_ids()).logits
    assert_close(out, ref)


def test_merge_and_unload_8bit_merges_into_the_dequantised_weight(llama_dir):
    model = load_quantized_causal_lm(llama_dir, 8)
    h = elalora.get_model(model, _cfg())
    _train(model, h)
    a = h.adapters[3]
    scb = a.base_layer.weight.SCB if a.base_layer.weight.SCB is not None else a.base_layer.state.SCB
    # LLM.int8() row-wise absmax: W ≈ C · SCB / 127, computed by hand.
    expect = a.base_layer.weight.data.float() * (scb.float()[:, None] / 127.0) + a.delta_weight()
    merged = merge_and_unload(h)
    lin = merged.get_submodule(h.names[3])
    assert type(lin) is torch.nn.Linear
    torch.testing.assert_close(lin.weight, expect, rtol=1e-5, atol=0)  # bnb multiplies by fl(1/127)


def test_in_place_merge_on_a_quantised_base_says_what_to_do(llama_dir):
    model = load_quantized_causal_lm(llama_dir, 4)
    h = elalora.get_model(model, _cfg())
    with pytest.raises(QuantizationError, match="merge_and_unload"):
        h.merge()


def test_quantised_module_kept_in_full_is_refused(llama_dir):
    model = load_quantized_causal_lm(llama_dir, 4)
    with pytest.raises(elalora.config.ConfigError, match="quantised"):
        elalora.get_model(model, _cfg(target_modules=["q_proj"], modules_to_save=["down_proj"]))


def test_save_and_load_adapter_on_a_quantised_base(llama_dir, tmp_path):
    model = load_quantized_causal_lm(llama_dir, 4)
    h = elalora.get_model(model, _cfg())
    _train(model, h)
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    save_adapter(h, tmp_path / "ad")
    h2 = load_adapter(load_quantized_causal_lm(llama_dir, 4), tmp_path / "ad")
    assert h2.rank_pattern() == h.rank_pattern()
    with torch.no_grad():
        out = h2.model(input_ids=_ids()).logits
    assert_close(out, ref)


def test_bnb_config_errors():
    from elalora.quant import bnb_quantization_config

    with pytest.raises(QuantizationError, match="4 or 8"):
        bnb_quantization_config(3)
    with pytest.raises(QuantizationError, match="nf4"):
        bnb_quantization_config(4, quant_type="int4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = bnb_quantization_config(4, compute_dtype=torch.bfloat16)
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_compute_dtype == torch.bfloat16


def test_evaluation_does_not_stop_the_gradients_of_a_4bit_base(llama_dir):
    """Train, evaluate, train: after the no-grad eval pass every adapter still gets a gradient, the
    lowest layer's included. (On an AVX512-BF16 CPU, bitsandbytes 0.50 repacks a Linear4bit at its
    first eval pass and the repacked layer passes no gradient to its input; get_model prevents it.)"""
    model = load_quantized_causal_lm(llama_dir, 4)
    h = elalora.get_model(model, _cfg())
    _train(model, h, steps=2)  # ends in eval mode
    with torch.no_grad():
        model(input_ids=_ids()).logits
    assert not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                   for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit")
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, a in zip(h.names, h.adapters):
        assert a.lora_P.grad is not None and a.lora_P.grad.abs().sum() > 0, name


def _repack_for_cpu(layer):
    """bitsandbytes' own CPU inference repacking (pure torch; runs on any CPU)."""
    conv = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if conv is None:
        pytest.skip("this bitsandbytes has no CPU inference repacking")
    layer.weight.data, layer.weight.quant_state = conv(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu


def test_a_repacked_4bit_layer_dequantises_and_is_restored(llama_dir):
    model = load_quantized_causal_lm(llama_dir, 4)
    layer = model.model.layers[1].mlp.down_proj
    w0 = dequantize_weight(layer).float()
    _repack_for_cpu(layer)
    # the repacked layer computes with bf16 scales: each weight moves by at most bf16's rounding
    w1 = dequantize_weight(layer).float()
    assert layer.weight.quant_state.packing_format_for_cpu  # dequantising did not change the layer
    torch.testing.assert_close(w1, w0, rtol=2.0 ** -8, atol=0)
    assert not torch.equal(w1, torch.zeros_like(w1))
    for m in model.modules():  # as if bitsandbytes had found AVX512-BF16
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True
    h = elalora.get_model(model, _cfg())
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    # back in the standard layout with the scales the repacked layer used: the same weights
    assert torch.equal(dequantize_weight(layer).float(), w1)
    assert h.adapters
