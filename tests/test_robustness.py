"""Nothing breaks: resume, mixed precision, grad-scaler skips, checkpointing, crash-safe saves, bad input."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elalora
from elalora import ConfigError, TargetModuleError
from elalora.allocation.elalora import select_prune_grow
from elalora.persistence import AdapterLoadError

from conftest import tiny_bert, tiny_llama

CFG = dict(r=3, b=2, k=2, tinit=4, tfinal=6, delta_t=2, total_steps=30, seed=5, modules_to_save=["classifier"])


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)  # the data of step t depends on t only
    x = torch.randint(0, 100, (8, 10), generator=g)
    return x, (x[:, 0] > 50).long()


def _setup(form="svd"):
    model = tiny_bert(seed=0)
    h = elalora.get_model(model, elalora.ElaLoRAConfig(**CFG, form=form))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 30)
    return model, h, opt, sched


def _run(model, h, opt, sched, start, stop):
    model.train()
    for t in range(start, stop):
        x, y = _batch(t)
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        h.step(opt)
        sched.step()
        opt.zero_grad()


# both inside the dynamic phase (rounds at 6, 8, 10, …); the LoRA form (B·diag(m)·A) once
@pytest.mark.parametrize("form,stop_at", [("svd", 9), ("svd", 14), ("lora", 9)])
def test_plain_loop_resume_equals_uninterrupted(tmp_path, form, stop_at):
    model, h, opt, sched = _setup(form)
    assert {a.kind for a in h.adapters} == {form}
    _run(model, h, opt, sched, 0, 30)
    ref_events = [e.to_dict() for e in h.events]
    assert any(e["step"] >= stop_at for e in ref_events), "no rank change after the restart: nothing to compare"
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, h, opt, sched = _setup(form)
    _run(model, h, opt, sched, 0, stop_at)
    elalora.save_checkpoint(tmp_path / "ckpt.pt", h, opt, sched, extra={"next_step": stop_at})
    del model, h, opt, sched

    model, h, opt, sched = _setup(form)  # a fresh process would do exactly this
    extra = elalora.load_checkpoint(tmp_path / "ckpt.pt", h, opt, sched)
    assert extra["next_step"] == stop_at and h.step_count == stop_at
    _run(model, h, opt, sched, stop_at, 30)
    assert [e.to_dict() for e in h.events] == ref_events
    for n, p in model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def test_bf16_autocast_and_bf16_base():
    model = tiny_bert()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(**CFG))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for t in range(12):
        x, y = _batch(t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    assert h.events and torch.isfinite(loss)

    model = tiny_llama().to(torch.bfloat16)
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, b=1, tinit=1, tfinal=1, delta_t=1, total_steps=6))
    assert all(p.dtype == torch.float32 for p in h.adapter_parameters())  # fp32 adapters on a bf16 base
    opt = torch.optim.AdamW(h.adapter_parameters(), lr=1e-2)
    model.train()
    x = torch.randint(0, 100, (2, 8))
    for _ in range(6):
        out = model(input_ids=x, labels=x)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    assert h.events
    assert all(p.dtype == torch.float32 for p in h.adapter_parameters())  # new ranks keep the dtype


def test_fp16_gradscaler_skip_touches_neither_scores_nor_ranks():
    model = tiny_bert()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=3, form="svd", b=2, tinit=1, tfinal=1, delta_t=1,
                                                       total_steps=10))
    opt = torch.optim.AdamW(h.adapter_parameters(), lr=5e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model.train()
    for t in range(3):
        x, y = _batch(t)
        scaler.scale(model(input_ids=x, labels=y).loss).backward()
        scaler.step(opt)
        h.step(opt)
        scaler.update()
        opt.zero_grad()
    sens = [s.clone() for s in h.importance.sens]
    pattern, n_events = h.rank_pattern(), len(h.events)
    x, y = _batch(3)
    scaler.scale(model(input_ids=x, labels=y).loss).backward()
    h.adapters[2].lora_Q.grad[0, 0] = float("inf")  # overflow
    scale = scaler.get_scale()
    scaler.step(opt)  # skipped by the scaler
    events = h.step(opt)  # t = 3 would be a round
    scaler.update()
    assert scaler.get_scale() < scale
    assert events == [] and len(h.events) == n_events and h.rank_pattern() == pattern
    assert all(torch.equal(a, b) for a, b in zip(sens, h.importance.sens))
    assert h.importance.num_skipped == 1


def test_a_head_added_to_the_optimizer_later_is_checked_too():
    """handle.step lists the optimizer's non-adapter parameters once per optimizer (not every step), and
    again when a parameter group is added: an overflow in a head added mid-run still skips the step."""
    model = tiny_bert()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=3, form="svd", b=2, tinit=1, tfinal=1, delta_t=1,
                                                       total_steps=10))
    opt = torch.optim.SGD(h.adapter_parameters(), lr=1e-3)
    model.train()
    for t in range(2):
        x, y = _batch(t)
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    assert h._other_params(opt) == []
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    for p in head:
        p.requires_grad_(True)
    opt.add_param_group({"params": head, "lr": 0.0})
    assert h._other_params(opt) == head
    x, y = _batch(2)
    model(input_ids=x, labels=y).loss.backward()
    opt.step()
    head[0].grad[0, 0] = float("nan")
    assert h.step(opt) == [] and h.importance.num_skipped == 1
    # a fresh optimizer over the adapters only: its own (empty) list, the old one's is not reused
    assert h._other_params(torch.optim.SGD(h.adapter_parameters(), lr=1e-3)) == []


def test_gradient_checkpointing():
    model = tiny_bert()
    import warnings

    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    h = elalora.get_model(model, elalora.ElaLoRAConfig(**CFG))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for t in range(12):
        x, y = _batch(t)
        model(input_ids=x, labels=y).loss.backward()
        assert all(p.grad is not None for p in h.adapter_parameters())
        opt.step()
        h.step(opt)
        opt.zero_grad()
    assert h.events


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    """SIGKILL a process while it rewrites a checkpoint over and over: the file always loads."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import elalora
        from conftest import tiny_bert
        h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=3, b=1, total_steps=10))
        big = {{"pad": torch.randn(4_000_000)}}  # ~16 MB so a write takes a while
        elalora.save_checkpoint({str(tmp_path / 'ck.pt')!r}, h, extra={{"i": 0, **big}})
        print("ready", flush=True)
        i = 0
        while True:
            i += 1
            elalora.save_checkpoint({str(tmp_path / 'ck.pt')!r}, h, extra={{"i": i, **big}})
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=3, b=1, total_steps=10))
    extra = elalora.load_checkpoint(tmp_path / "ck.pt", h)
    assert extra["i"] >= 0 and extra["pad"].numel() == 4_000_000
    # a truncated checkpoint fails clearly
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        elalora.load_checkpoint(tmp_path / "bad.pt", h)


# ------------------------------------------------------------------------------------ bad input
E = elalora.ElaLoRAConfig
BAD_CONFIGS = [
    (lambda: E(r=0), "r must be an integer >= 1"),
    (lambda: E(r=-2), "r must be an integer >= 1"),
    (lambda: E(r=2.5), "r must be an integer >= 1"),
    (lambda: E(k=0), r"k \(candidates per matrix\) must be an integer >= 1"),
    (lambda: E(b=0), r"b \(ranks moved per round\) must be an integer >= 1"),
    (lambda: E(r=8, max_rank=4), r"max_rank \(capacity\) must be an integer >= r=8"),
    (lambda: E(r=4, min_rank=5), r"min_rank must be an integer in \[0, r=4\]"),
    (lambda: E(tinit=600, tfinal=500, total_steps=1000), "tinit \\+ tfinal must be < total_steps"),
    (lambda: E(tinit=0.5, tfinal=0.5, total_steps=100), "tinit \\+ tfinal must be < total_steps"),
    (lambda: E(delta_t=0), "delta_t must be an integer number of steps >= 1"),
    (lambda: E(delta_t=-5), "delta_t must be an integer number of steps >= 1"),
    (lambda: E(tinit=1.5), r"tinit as a fraction of the total steps must be in \[0, 1\)"),
    (lambda: E(tinit="10"), "tinit must be an int"),
    (lambda: E(beta1=0.0), r"beta1 must be in \(0, 1\)"),
    (lambda: E(beta2=1.0), r"beta2 must be in \(0, 1\)"),
    (lambda: E(beta1=-0.3), r"beta1 must be in \(0, 1\)"),
    (lambda: E(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (lambda: E(lora_alpha=0), "lora_alpha must be > 0"),
    (lambda: E(orth_reg_weight=-0.1), "orth_reg_weight must be >= 0"),
    (lambda: E(total_steps=0), "total_steps must be an integer >= 1"),
    (lambda: E(target_modules=[]), "target_modules must be a non-empty list"),
    (lambda: E(target_modules="(query"), "target_modules is not a valid regular expression"),
    (lambda: E(r=2, rank_pattern={"a": 9}), r"rank_pattern values must be integers in \[min_rank=1, max_rank=4\]"),
    (lambda: E(seed="x"), "seed must be an integer"),
    (lambda: elalora.AdaLoRAConfig(r=8, init_r=4), "init_r must be an integer >= r"),
    (lambda: elalora.ALoRAConfig(r=4, max_rank=2), r"max_rank \(capacity\) must be an integer >= r=4"),
    (lambda: elalora.get_model(tiny_bert(), E(r=2, b=100)), "b=100 is too large for the candidate pool"),
    (lambda: elalora.get_model(tiny_bert(), E(r=2, target_modules=["nonexistent"])),
     "matched no nn.Linear/Conv1D layer.*query"),
    (lambda: elalora.get_model(tiny_bert(), E(r=2, modules_to_save=["head_that_is_not_there"])), "match no parameter"),
    (lambda: elalora.get_model(tiny_bert(), E(r=2)).step(), "total_steps is unknown"),
]


@pytest.mark.parametrize("make,message", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_configuration_fails_early_with_a_clear_message(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_wrapping_twice_fails():
    model = tiny_bert()
    elalora.get_model(model, E(r=2))
    with pytest.raises(TargetModuleError, match="already"):
        elalora.get_model(model, E(r=2))


def test_resume_from_checkpoint_of_another_layout_fails(tmp_path):
    h = elalora.get_model(tiny_bert(), E(r=2, total_steps=10))
    elalora.save_checkpoint(tmp_path / "c.pt", h)
    other = elalora.get_model(tiny_bert(), E(r=2, b=1, total_steps=10, target_modules=["query"]))
    with pytest.raises(ValueError, match="adapts different modules"):
        elalora.load_checkpoint(tmp_path / "c.pt", other)
    ada = elalora.get_model(tiny_bert(), elalora.AdaLoRAConfig(r=2, total_steps=10))
    with pytest.raises(ValueError, match="method 'elalora'"):
        elalora.load_checkpoint(tmp_path / "c.pt", ada)


# ------------------------------------------------------------------------------ property tests
@st.composite
def _round_inputs(draw):
    m_count = draw(st.integers(1, 10))
    cap = draw(st.integers(1, 8))
    k = draw(st.integers(1, 4))
    b = draw(st.integers(1, 6))
    min_rank = draw(st.integers(0, 2))
    active, scores = [], []
    for _ in range(m_count):
        mask = draw(st.lists(st.booleans(), min_size=cap, max_size=cap))
        vals = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]) | st.floats(0, 10, allow_nan=False),
                             min_size=cap, max_size=cap))
        active.append(torch.tensor(mask, dtype=torch.bool))
        scores.append(torch.tensor(vals, dtype=torch.float64))
    return active, scores, cap, k, b, min_rank


@settings(max_examples=300, deadline=None)
@given(_round_inputs())
def test_property_round_invariants(inp):
    active, scores, cap, k, b, min_rank = inp
    prune, grow = select_prune_grow(scores, active, [cap] * len(active), k=k, b=b, min_rank=min_rank)
    n_prune = sum(len(v) for v in prune.values())
    assert n_prune == sum(grow.values()) <= b  # total rank constant, at most b moves
    for m, a in enumerate(active):
        r = int(a.sum())
        p = prune.get(m, [])
        assert len(set(p)) == len(p) and all(bool(a[s]) for s in p)  # only active slots, each once
        new = r - len(p) + grow.get(m, 0)
        assert new <= cap  # within capacity
        assert len(p) == 0 or r - len(p) >= min_rank  # never pruned below the minimum
        assert len(p) <= k and grow.get(m, 0) <= k  # |Δr| <= k per matrix per round
    # deterministic
    assert (prune, grow) == select_prune_grow(scores, active, [cap] * len(active), k=k, b=b, min_rank=min_rank)
