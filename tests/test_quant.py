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
                           load_quantized_causal_lm)

from conftest import tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=0).save_pretrained(d)
    return str(d)


def _cfg(**kw):
    base = dict(r=2, b=1, k=1, tinit=2, tfinal=2, delta_t=2, total_steps=12, seed=1)
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
    # down_proj is 64 -> 32: the adapter follows in/out_features, not the packed (1024 x 1) uint8 storage.
    assert (a.in_features, a.out_features) == (64, 32)
    c = a.capacity
    assert a.lora_Q.shape == (c, 64) and a.lora_P.shape == (32, c) and a.lora_Q.dtype == torch.float32
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
    fmodel = tiny_llama(seed=0)
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
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        out = pm(input_ids=_ids()).logits
    # Same quantised weights, same fp32 LoRA factors: only the order of the adapter matmuls differs.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_4bit_returns_float_linear_layers(llama_dir):
    model = load_quantized_causal_lm(llama_dir, 4)
    h = elalora.get_model(model, _cfg())
    _train(model, h)
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
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


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
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


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
