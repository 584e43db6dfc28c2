"""Adapter forms (``form="svd" | "lora"``): the LoRA form is PEFT's LoRA when its ranks are frozen;
new ranks keep ΔW; scores, rounds, budgets and persistence work on both forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import elalora
from elalora import AdaLoRAConfig, ElaLoRAConfig, get_model
from elalora.config import ConfigError
from elalora.layers import ADAPTER_FORMS, GatedLoRAAdapter, adapter_param_count

from conftest import tiny_bert
from tolerances import assert_close

FORMS = sorted(ADAPTER_FORMS)


def _batches(n=12, seed=0, vocab=100, bs=4, seq=9):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (bs, seq), generator=g),
             "attention_mask": torch.ones(bs, seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (bs,), generator=g)} for _ in range(n)]


TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def test_lora_form_with_frozen_ranks_is_peft_lora():
    """Same A (copied from PEFT's init), B = 0, scale α/r = 2: the same losses at every step of AdamW."""
    import peft

    r = 4
    base = tiny_bert(seed=0).double().train()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                                  lora_dropout=0.0, modules_to_save=["classifier"]))
    ours = copy.deepcopy(base)
    h = get_model(ours, ElaLoRAConfig(r=r, form="lora", target_modules=TARGETS, modules_to_save=["classifier"]))
    assert h.config.lora_alpha == 2 * r and all(isinstance(a, GatedLoRAAdapter) for a in h.adapters)
    inner = pm.base_model.model
    with torch.no_grad():
        for name, a in zip(h.names, h.adapters):
            lay = inner.get_submodule(name)
            assert a.scaling == lay.scaling["default"] == 2.0
            a.lora_A[:r].copy_(lay.lora_A["default"].weight)
            assert torch.all(lay.lora_B["default"].weight == 0) and torch.all(a.lora_B == 0)
    # the same number of trainable parameters at r (the capacity 2r slots beyond r are zero and inactive)
    n_peft = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n)
    assert h.parameter_counts()["adapter_active"] == n_peft
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    lp, lo = [], []
    for b in _batches():
        for model, opt, out in ((pm, opt_p, lp), (ours, opt_o, lo)):
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss))
    assert lp[-1] < lp[0] - 1e-3  # it trains
    assert max(abs(a - b) for a, b in zip(lp, lo)) < 1e-10, (lp, lo)


def test_lora_form_init_is_peft_kaiming():
    torch.manual_seed(0)
    base = nn.Linear(300, 40)
    a = GatedLoRAAdapter(base, r=8, capacity=16, lora_alpha=16, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(300)  # PEFT: kaiming_uniform_(a=√5) on (r × d_in): U(−1/√d_in, 1/√d_in)
    act = a.lora_A[:8]
    assert float(act.abs().max()) <= bound and float(act.abs().max()) > 0.95 * bound
    assert abs(float(act.std()) - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.all(a.lora_B == 0) and torch.all(a.lora_A[8:] == 0)


@pytest.mark.parametrize("form", FORMS)
def test_new_ranks_keep_delta_w_and_are_orthogonal(form):
    torch.manual_seed(0)
    cls = ADAPTER_FORMS[form]
    a = cls(nn.Linear(24, 16), r=4, capacity=8, lora_alpha=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a trained state: non-zero ΔW
        for _, p, _ in a.slot_parameters():
            p.normal_()
            p.mul_(a.active.to(p.dtype) if p.dim() == 1 else 1.0)
        a.deactivate(a.inactive_indices().tolist())
    before = a.delta_weight(torch.float64)
    a.activate([5, 6], generator=torch.Generator().manual_seed(3))
    assert_close(a.delta_weight(torch.float64), before)
    down, _, _ = a._factors()
    act = a.active_indices()
    new = down[[5, 6]].double()
    old = down[[i for i in act.tolist() if i not in (5, 6)]].double()
    # new rows orthogonal to the active ones and to each other (relative to their norms)
    cos = (new @ old.t()) / (new.norm(dim=1, keepdim=True) * old.norm(dim=1)[None])
    assert float(cos.abs().max()) < 1e-5
    assert abs(float(new[0] @ new[1])) < 1e-5 * float(new[0].norm() * new[1].norm())
    if form == "lora":  # Kaiming scale kept; B column 0
        bound = 1 / math.sqrt(24)
        assert 0.2 * bound * math.sqrt(24) < float(new[0].norm()) < 1.2 * bound * math.sqrt(24)
        assert torch.all(a.lora_B[:, [5, 6]] == 0)


def test_form_config_rules():
    # ElaLoRA defaults to the LoRA form (protocol v3's rule, docs/results.md), AdaLoRA to the SVD form (PEFT's)
    assert ElaLoRAConfig(r=8).form == "lora" and ElaLoRAConfig(r=8, form="svd").lora_alpha == 16
    assert ElaLoRAConfig(r=8, form="lora").lora_alpha == 16  # 2 r
    assert ElaLoRAConfig(r=2, form="lora").lora_alpha == 4
    assert AdaLoRAConfig(r=8, form="lora").lora_alpha == 24  # 2 init_r: scale 2, as LoRA's
    assert AdaLoRAConfig(r=8).form == "svd" and AdaLoRAConfig(r=8).lora_alpha == 16
    from elalora.config import config_from_dict

    legacy = ElaLoRAConfig(r=2, form="svd").to_dict()
    legacy.pop("form")  # saved before forms existed: every adapter was the SVD form then
    assert config_from_dict(legacy).form == "svd" and config_from_dict(ElaLoRAConfig(r=2).to_dict()).form == "lora"
    with pytest.raises(ConfigError, match="form must be one of"):
        ElaLoRAConfig(form="dora")
    with pytest.raises(ConfigError, match="orth_reg_weight.*form='lora' has none"):
        ElaLoRAConfig(form="lora", orth_reg_weight=0.1)
    with pytest.raises(ConfigError, match="budget must be"):
        AdaLoRAConfig(budget="flops")
    with pytest.raises(ConfigError, match="grace_rounds"):
        ElaLoRAConfig(grace_rounds=-1)
    # grace: the form's default (the LoRA form's 1 from docs/results.md §3's rule; the SVD form keeps the paper's 0);
    # a saved config keeps the grace it ran with, whatever the default is now
    assert ElaLoRAConfig(r=2).grace_rounds == 1 and ElaLoRAConfig(r=2, form="svd").grace_rounds == 0
    assert ElaLoRAConfig(r=2, grace_rounds=0).grace_rounds == 0
    assert config_from_dict(ElaLoRAConfig(r=2, grace_rounds=0).to_dict()).grace_rounds == 0
    legacy.pop("grace_rounds")  # saved before forms and grace existed: the SVD form, no grace, as it ran
    assert config_from_dict(legacy).grace_rounds == 0
    assert adapter_param_count("svd", 3, 10, 20) == 3 * 31 and adapter_param_count("lora", 3, 10, 20) == 90


def _train(model, h, steps, seed=0, lr=5e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    h.set_total_steps(steps)
    model.train()
    for b in _batches(steps, seed):
        model(**b).loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["elalora", "adalora"])
def test_rounds_and_save_load_on_both_forms(form, method, tmp_path):
    model = tiny_bert(seed=1)
    cls = ElaLoRAConfig if method == "elalora" else AdaLoRAConfig
    kw = dict(b=2, k=2) if method == "elalora" else {}
    h = get_model(model, cls(r=2, form=form, tinit=2, tfinal=3, delta_t=2, modules_to_save=["classifier"], **kw))
    total0 = h.total_rank
    _train(model, h, 20)
    assert h.events, "no round changed a rank"
    if method == "elalora":
        assert h.total_rank == total0
    else:
        assert h.total_rank == 2 * len(h.adapters) < total0
    assert all(a.kind == form for a in h.adapters)
    model.eval()
    b = _batches(1, 9)[0]
    with torch.no_grad():
        want = model(**b).logits
    h.save_pretrained(str(tmp_path / "ad"))
    h2 = elalora.load_adapter(tiny_bert(seed=1), str(tmp_path / "ad"))
    assert h2.config.form == form and h2.rank_pattern() == h.rank_pattern()
    with torch.no_grad():
        assert_close(h2.model(**b).logits, want)
    # exact PEFT export, both layouts
    import peft

    for layout in ("compact", "uniform"):
        h.export_peft(str(tmp_path / layout), layout=layout)
        pm = peft.PeftModel.from_pretrained(tiny_bert(seed=1), str(tmp_path / layout)).eval()
        with torch.no_grad():
            assert_close(pm(**b).logits, want)


@pytest.mark.parametrize("form", FORMS)
def test_param_budget_keeps_active_parameters_within_the_start(form):
    model = tiny_bert(seed=2)
    # intermediate (32 -> 37) and output (37 -> 32) cost 69 per rank, attention 64: unequal costs
    h = get_model(model, ElaLoRAConfig(r=2, form=form, budget="params", tinit=2, tfinal=3, delta_t=1, b=4,
                                       modules_to_save=["classifier"]))
    start = h.parameter_counts()["adapter_active"]
    assert h.allocator.param_budget == start
    seen = []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    h.set_total_steps(24)
    model.train()
    for b in _batches(24, 3):
        model(**b).loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
        seen.append(h.parameter_counts()["adapter_active"])
    assert h.events and max(seen) <= start


def test_adalora_param_budget_prunes_to_the_parameters_of_r_ranks():
    model = tiny_bert(seed=2)
    h = get_model(model, AdaLoRAConfig(r=2, form="lora", budget="params", tinit=2, tfinal=3, delta_t=2,
                                       modules_to_save=["classifier"]))
    target = sum(2 * adapter_param_count("lora", 1, a.in_features, a.out_features) for a in h.adapters)
    _train(model, h, 20)
    assert h.parameter_counts()["adapter_active"] <= target
    # the best-first rule stops at the first rank that does not fit: within one rank's cost of the target
    assert h.parameter_counts()["adapter_active"] > target - max(a.in_features + a.out_features for a in h.adapters)


@pytest.mark.parametrize("form", FORMS)
def test_grace_rounds_protect_newborn_ranks_and_churn_is_counted(form):
    def run(grace):
        model = tiny_bert(seed=4)
        h = get_model(model, ElaLoRAConfig(r=2, form=form, tinit=2, tfinal=2, delta_t=1, b=3, use_scheduler=False,
                                           grace_rounds=grace, modules_to_save=["classifier"]))
        _train(model, h, 24, seed=5)
        return h

    h0, h2 = run(0), run(2)
    c0, c2 = h0.allocator.churn(), h2.allocator.churn()
    assert c0["grown"] > 0 and c2["grown"] > 0
    assert c2["pruned_young"] == 0  # protected for 2 rounds: never pruned within 2 rounds of its birth
    assert c0["pruned_young"] > 0  # without protection newborn ranks (score ≈ 0) are pruned again
    # the birth rounds survive a save of the allocator state
    st = h2.allocator.state_dict()
    h2.allocator.load_state_dict(copy.deepcopy(st))
    assert h2.allocator.born == st["born"] and h2.allocator.churn() == c2


@pytest.mark.parametrize("form", FORMS)
def test_grace_never_protects_initial_ranks_so_the_first_rounds_move_as_without_grace(form):
    """Grace protects grown ranks only: until a round grows one, grace 2 makes the same moves as grace 0
    (a bug made every initial rank look grown in round -1, so the first g rounds moved nothing)."""
    def events(grace):
        model = tiny_bert(seed=4)
        h = get_model(model, ElaLoRAConfig(r=2, form=form, tinit=2, tfinal=2, delta_t=1, b=3, use_scheduler=False,
                                           grace_rounds=grace, modules_to_save=["classifier"]))
        _train(model, h, 24, seed=5)
        return [e.to_dict() for e in h.events]

    e0, e2 = events(0), events(2)
    assert e0, "the run must move ranks"
    first = e0[0]["step"]
    assert [e for e in e2 if e["step"] == first] == [e for e in e0 if e["step"] == first]


def test_saved_form_must_match_module_kinds(tmp_path):
    import json

    model = tiny_bert(seed=1)
    h = get_model(model, ElaLoRAConfig(r=2, form="lora", modules_to_save=["classifier"]))
    h.save_pretrained(str(tmp_path / "ad"))
    p = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["config"]["form"] = "svd"
    p.write_text(json.dumps(cfg))
    with pytest.raises(elalora.errors.AdapterLoadError, match="form 'svd' but the modules are of form lora"):
        elalora.load_adapter(tiny_bert(seed=1), str(tmp_path / "ad"))
