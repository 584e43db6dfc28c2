"""ALoRA (AB-LoRA): batched ablation scores, the reallocation rule, rounds, the Trainer callback."""

import copy

import pytest
import torch
from torch.utils.data import Dataset

import elalora
from elalora.allocation.alora import ablation_scores, distribute_new_ranks, plan_round, select_prune
from elalora.config import ConfigError

from conftest import tiny_bert, tiny_llama
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and keeps the shared machine free."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _val_batch(n=6, length=9, seed=0, num_labels=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 6:] = 0  # some padding
    mask[3, 4:] = 0
    labels = torch.rand(n, generator=g) if num_labels == 1 else torch.randint(0, num_labels, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _handle(model, **kw):
    base = dict(r=2, max_rank=4, modules_to_save=["classifier"], k1=3, k2=2, n_rounds=3, total_steps=20)
    base.update(kw)
    return elalora.get_model(model, elalora.ALoRAConfig(**base))


@torch.no_grad()
def _randomise(h, seed=0, switch_off=True):
    """Non-zero B (fresh LoRA has B = 0, hence ΔW = 0 and every score 0) and one slot switched off."""
    g = torch.Generator().manual_seed(seed)
    for a in h.adapters:
        a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.5)
    if switch_off:
        h.adapters[1].deactivate([0])
        h.adapters[4].activate([2], generator=g)
        h.adapters[4].lora_B[:, 2] = torch.randn(h.adapters[4].out_features, generator=g)
    for a in h.adapters:
        a.lora_B.mul_(a.active.to(a.lora_B.dtype))


@torch.no_grad()
def _reference_scores(model, h, batch):
    """The slow definition: one forward pass per ablation, masks set by hand on ``adapter.active``,
    the model's own loss (``outputs.loss``). Returns the scores and the largest |loss| seen, the
    magnitude of the terms that each score sums (see ``_assert_scores_equal``)."""
    saved = [a.active.clone() for a in h.adapters]
    seen = []

    def loss():
        seen.append(float(model(**batch).loss))
        return seen[-1]

    full = loss()
    scores = [torch.full((a.capacity,), float("nan"), dtype=torch.float64) for a in h.adapters]
    for m, a in enumerate(h.adapters):
        for s in saved[m].nonzero().flatten().tolist():
            a.active[s] = False
            removed = loss()
            a.active.copy_(saved[m])
            for b in h.adapters:
                b.active.zero_()
            a.active[s] = True
            kept = loss()
            for b, sv in zip(h.adapters, saved):
                b.active.copy_(sv)
            scores[m][s] = (-full) - (-removed) + (-kept)
    return scores, max(abs(v) for v in seen)


@torch.no_grad()
def _reference_losses(model, h, batch):
    """The slow definition, losses of every mask: ``(L(M), removed, kept)`` aligned like the
    ``return_losses`` output of :func:`ablation_scores` (one forward pass per mask, ``adapter.active``
    set by hand, the model's own ``outputs.loss``)."""
    saved = [a.active.clone() for a in h.adapters]

    def loss():
        return float(model(**batch).loss)

    full = loss()
    rem = [torch.full((a.capacity,), float("nan"), dtype=torch.float64) for a in h.adapters]
    kep = [torch.full((a.capacity,), float("nan"), dtype=torch.float64) for a in h.adapters]
    for m, a in enumerate(h.adapters):
        for s in saved[m].nonzero().flatten().tolist():
            a.active[s] = False
            rem[m][s] = loss()
            a.active.copy_(saved[m])
            for b in h.adapters:
                b.active.zero_()
            a.active[s] = True
            kep[m][s] = loss()
            for b, sv in zip(h.adapters, saved):
                b.active.copy_(sv)
    return full, rem, kep


def _assert_losses_close(fast, slow):
    """The losses of every mask (float32 forward passes, each a reduction over the batch) agree at
    float32's tolerance of the loss magnitude (tests/tolerances.py); NaN (inactive slots) in the same
    places."""
    (f0, frem, fkep), (s0, srem, skep) = fast, slow
    assert_close(torch.as_tensor(f0), torch.as_tensor(s0), dtype=torch.float32)
    for a, b in zip(frem + fkep, srem + skep):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        ok = ~torch.isnan(b)
        assert_close(a[ok], b[ok], dtype=torch.float32)


def _assert_scores_equal(fast, slow):
    """Each score is a sum of three float32 losses (−full + removed − kept), each a reduction over the
    batch computed batched in one and one-by-one in the other: its error is float32's tolerance of
    the loss magnitude, three times (tests/tolerances.py), not of the (small) score itself."""
    slow, loss_scale = slow
    for f, s in zip(fast, slow):
        assert torch.equal(torch.isnan(f), torch.isnan(s))
        ok = ~torch.isnan(s)
        assert_close(f[ok], s[ok], dtype=torch.float32, scale=3 * loss_scale)


# ------------------------------------------------------------------------- (1) batched == slow loop
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_batched_ablation_equals_slow_reference(chunk):
    model = tiny_bert()
    h = _handle(model)
    _randomise(h)
    batch = _val_batch()
    slow = _reference_scores(model, h, batch)
    model.train()  # the ablations must run in eval mode and give train mode back
    fast = ablation_scores(model, h.adapters, batch, chunk=chunk)
    _assert_scores_equal(fast, slow)
    assert model.training and all(m.training for m in model.modules())
    assert all(a.example_gate is None for a in h.adapters)
    # inactive slots score NaN; the scores are not all equal (B ≠ 0)
    assert torch.isnan(fast[1][0]) and torch.isnan(fast[0][2])
    finite = torch.cat([f[~torch.isnan(f)] for f in fast])
    assert finite.numel() == h.total_rank and finite.std() > 1e-4


def test_batched_ablation_regression_and_causal_lm():
    model = tiny_bert(num_labels=1)
    h = _handle(model)
    _randomise(h, seed=1)
    batch = _val_batch(num_labels=1)
    _assert_scores_equal(ablation_scores(model, h.adapters, batch, chunk=5), _reference_scores(model, h, batch))

    llama = tiny_llama()
    h = elalora.get_model(llama, elalora.ALoRAConfig(r=1, max_rank=2,
                                                     target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomise(h, seed=2, switch_off=False)
    b = _val_batch(n=4, length=8)
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    labels[1, :3] = -100
    batch = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}
    _assert_scores_equal(ablation_scores(llama, h.adapters, batch, chunk=4), _reference_scores(llama, h, batch))


# ------------------------------------------------------------- (1b) prefix reuse == slow reference
class _CallCounter:
    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_pre_hook(self)

    def __call__(self, *a):
        self.n += 1


def _llama_batch():
    b = _val_batch(n=4, length=8)
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    labels[1, :3] = -100
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_prefix_reuse_equals_slow_reference(family, chunk):
    if family == "bert":
        model = tiny_bert(layers=3)
        h = _handle(model)
        _randomise(h)
        batch = _val_batch()
    else:
        model = tiny_llama()
        h = elalora.get_model(model, elalora.ALoRAConfig(r=2, max_rank=3))  # q, k, v, o, gate, up, down
        _randomise(h, seed=2, switch_off=False)
        batch = _llama_batch()
    slow = _reference_losses(model, h, batch)
    # the first adapted layer's frozen base layer (the adapter module itself is stubbed, not skipped,
    # so its hooks would still fire)
    calls = _CallCounter(h.adapters[0].base_layer)
    seen = []
    model.train()
    scores, fast = ablation_scores(model, h.adapters, batch, chunk=chunk, return_losses=True,
                                   progress=lambda d, t: seen.append((d, t)))
    calls.h.remove()
    _assert_losses_close(fast, slow)
    batched = ablation_scores(model, h.adapters, batch, chunk=chunk, prefix_reuse=False, return_losses=True)[1]
    _assert_losses_close(fast, batched)
    _assert_scores_equal(scores, _reference_scores(model, h, batch))
    # the prefix was reused: the first adapted layer ran in the three caching passes and in the
    # chunks holding its own masks only, not once per chunk
    n_masks = 1 + 2 * h.total_rank
    n_chunks = -(-(n_masks - 1) // chunk)
    assert calls.n <= 3 + -(-2 * h.adapters[0].rank // chunk) + 1
    assert n_chunks == 1 or calls.n < 3 + n_chunks
    # progress: from 0 to every mask, never backwards; training flags and gates restored
    assert seen[0] == (0, n_masks) and seen[-1] == (n_masks, n_masks)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert model.training and all(a.example_gate is None for a in h.adapters)
    assert all("forward" not in m.__dict__ for m in model.modules())  # every stub removed


class _Twice(torch.nn.Module):
    """A toy model with an adapted layer called twice per forward (shared weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8)
        self.first = torch.nn.Linear(8, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.last = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids):
        x = torch.tanh(self.first(self.emb(input_ids)))
        x = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.head(self.last(x).mean(1))


def test_prefix_reuse_fallbacks():
    def per_example_ce(outputs, b):
        return torch.nn.functional.cross_entropy(outputs, b["labels"], reduction="none")

    model = _Twice()
    h = elalora.get_model(model, elalora.ALoRAConfig(r=2, max_rank=3, target_modules=["first", "shared", "last"]))
    _randomise(h, switch_off=False)
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 50, (5, 6), generator=g), "labels": torch.randint(0, 3, (5,), generator=g)}
    slow = ablation_scores(model, h.adapters, batch, chunk=3, loss_fn=per_example_ce, prefix_reuse=False,
                           return_losses=True)[1]
    # "shared" is called twice per forward: never stubbed, its masks recompute it; "first" finished
    # before "shared" started, so the masks of "shared" and "last" skip it
    calls = _CallCounter(h.adapters[0].base_layer)
    fast = ablation_scores(model, h.adapters, batch, chunk=3, loss_fn=per_example_ce, return_losses=True)[1]
    calls.h.remove()
    _assert_losses_close(fast, slow)
    assert calls.n == 3 + 2  # three caching passes, then the chunks of first's own 4 masks only


def test_prefix_reuse_stub_called_twice_falls_back():
    class _Sneaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(50, 8)
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, input_ids):
            x = self.emb(input_ids)
            y = self.a(x)
            y = y + self.a.forward(x)  # a second call the hooks do not see
            return self.head(self.b(torch.tanh(y)).mean(1))

    def per_example_ce(outputs, b):
        return torch.nn.functional.cross_entropy(outputs, b["labels"], reduction="none")

    model = _Sneaky()
    h = elalora.get_model(model, elalora.ALoRAConfig(r=2, max_rank=3, target_modules=["a", "b"]))
    _randomise(h, switch_off=False)
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 50, (5, 6), generator=g), "labels": torch.randint(0, 3, (5,), generator=g)}
    slow = ablation_scores(model, h.adapters, batch, chunk=4, loss_fn=per_example_ce, prefix_reuse=False,
                           return_losses=True)[1]
    with pytest.warns(RuntimeWarning, match="prefix reuse is off"):
        fast = ablation_scores(model, h.adapters, batch, chunk=4, loss_fn=per_example_ce, return_losses=True)[1]
    _assert_losses_close(fast, slow)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_custom_loss_fn_and_cleanup_on_error():
    model = tiny_bert()
    h = _handle(model)
    _randomise(h)
    batch = _val_batch()

    def per_example_ce(outputs, b):
        return torch.nn.functional.cross_entropy(outputs.logits, b["labels"], reduction="none")

    _assert_scores_equal(ablation_scores(model, h.adapters, batch, chunk=6, loss_fn=per_example_ce),
                         _reference_scores(model, h, batch))

    def boom(outputs, b):
        raise KeyError("boom")

    model.train()
    with pytest.raises(KeyError):
        ablation_scores(model, h.adapters, batch, chunk=4, loss_fn=boom)
    assert model.training and all(a.example_gate is None for a in h.adapters)


# -------------------------------------------------------------------------- (2) reallocation rule
def test_reallocation_rule_footnote_capacity_and_everyone_pruned():
    # the paper's footnote: n_A = 8 new ranks over three un-pruned modules → 3, 3, 2, leftover to the
    # higher average importance
    assert distribute_new_ranks(8, [0.9, 0.5, 0.2], [100, 100, 100]) == [3, 3, 2]
    assert distribute_new_ranks(8, [0.2, 0.9, 0.5], [100, 100, 100]) == [2, 3, 3]
    assert distribute_new_ranks(8, [0.5, 0.5, 0.5], [100, 100, 100]) == [3, 3, 2]  # ties: lower index first
    # capacity: a full module gets no more; its share goes to the next ones
    assert distribute_new_ranks(8, [0.9, 0.5, 0.2], [1, 100, 100]) == [1, 4, 3]
    assert distribute_new_ranks(8, [0.9, 0.5, 0.2], [0, 2, 100]) == [0, 2, 6]
    # not enough room anywhere: only what fits is added (the budget shrinks)
    assert distribute_new_ranks(8, [0.9, 0.5, 0.2], [1, 1, 1]) == [1, 1, 1]
    assert distribute_new_ranks(3, [], []) == []

    # the same example through a whole round: 11 modules of rank 2; the 8 weakest ranks lie in
    # modules 0–7 (one each), modules 8, 9, 10 lose none and get 3, 3, 2 by average importance
    scores, active = [], []
    for m in range(11):
        s = torch.full((8,), float("nan"), dtype=torch.float64)
        s[:2] = torch.tensor([-1.0 + 0.01 * m, 5.0]) if m < 8 else torch.tensor([1.0, 1.0 + m])
        scores.append(s)
        a = torch.zeros(8, dtype=torch.bool)
        a[:2] = True
        active.append(a)
    prune, grow = plan_round(scores, active, [8] * 11, n_a=8, min_rank=1)
    assert prune == {m: [0] for m in range(8)}
    assert grow == {10: 3, 9: 3, 8: 2}  # module 10 has the highest average importance

    # the paper's rule (keep_budget=False): everyone lost a rank → nothing is added
    prune, grow = plan_round(scores, active, [8] * 11, n_a=11, min_rank=1, keep_budget=False)
    assert sum(len(v) for v in prune.values()) == 11 and len(prune) == 11 and grow == {}
    # keep the budget (default): prune only what the un-pruned modules can take back. Room 6 per
    # module: k pruned (one per module) fit while k <= 6 (11 - k), so k = 9; the last two modules
    # (9 and 10, which lose none) get 5 and 4 by average importance
    prune, grow = plan_round(scores, active, [8] * 11, n_a=11, min_rank=1)
    assert prune == {m: [0] for m in range(8)} | {8: [0]}
    assert grow == {10: 5, 9: 4}


def test_select_prune_order_and_min_rank():
    scores = [torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.0, 9.0], dtype=torch.float64)]
    active = [torch.tensor([True, True, True]), torch.tensor([True, True, False])]
    # (score, module, slot): (0.0, 1, 1), (0.1, 0, 0), (0.1, 1, 0) — module 1 then at min_rank 1
    assert select_prune(scores, active, 3, min_rank=1) == {1: [1], 0: [0, 1]}
    assert select_prune(scores, active, 3, min_rank=0) == {1: [1, 0], 0: [0]}
    assert select_prune(scores, active, 10, min_rank=2) == {0: [0]}


# -------------------------------------------------------------------- (3) rounds in a plain loop
def _train(h, model, steps, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    all_events = []
    for _ in range(steps):
        x = torch.randint(0, 100, (8, 10), generator=g)
        y = (x[:, 0] > 50).long()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        all_events.append(h.step(opt))
        opt.zero_grad()
    return opt, all_events


def test_rounds_schedule_budget_and_events():
    model = tiny_bert()
    h = _handle(model, r=2, max_rank=6, n_a=4, k1=3, k2=2, n_rounds=3, total_steps=12)
    h.allocator.set_validation_batch(_val_batch(n=8))
    assert h.allocator.planned_rounds() == [2, 4, 6]
    start_total = h.total_rank
    opt, per_step = _train(h, model, 12)
    al = h.allocator
    assert al.round_steps == [2, 4, 6] and al.rounds_done == 3  # at most n_rounds, on the K1/K2 schedule
    assert [t for t, ev in enumerate(per_step) if ev] == [2, 4, 6]
    assert h.total_rank == start_total and al.budget_lost == 0  # some modules lose none: budget kept
    assert h.events and {e.step for e in h.events} == {2, 4, 6}
    for t in (2, 4, 6):
        ev = [e for e in h.events if e.step == t]
        assert sum(e.pruned for e in ev) == 4 and sum(e.grown for e in ev) == 4
        assert all(e.pruned == 0 or e.grown == 0 for e in ev)  # new ranks only where none was lost
        assert all(e.new_rank == e.old_rank - e.pruned + e.grown for e in ev)
        assert all(len(e.scores) == e.old_rank for e in ev)
    assert all(1 <= a.rank <= 6 for a in h.adapters)
    assert sorted(set(h.rank_pattern().values())) != [2]  # the allocation changed
    assert al.last_scores is not None and al.pruned_total == al.grown_total == 12

    # resume: the allocator's state round-trips; no round is repeated
    state = copy.deepcopy(h.state_dict())
    model2 = tiny_bert()
    h2 = _handle(model2, r=2, max_rank=6, n_a=4, k1=3, k2=2, n_rounds=3, total_steps=12)
    h2.load_state_dict(state)
    assert h2.allocator.rounds_done == 3 and h2.allocator.round_steps == [2, 4, 6]
    assert "val_batch" not in state["allocator"]
    assert not any(h2.allocator.is_round(t) for t in range(12))


def test_new_ranks_preserve_function_and_have_zero_moments():
    model = tiny_bert()
    h = _handle(model, r=2, max_rank=6, n_a=4, k1=2, k2=2, n_rounds=1, total_steps=6)
    h.allocator.set_validation_batch(_val_batch(n=8))
    opt, _ = _train(h, model, 1)  # step 0: no round yet; optimizer state exists
    x = torch.randint(0, 100, (8, 10))
    model(input_ids=x, labels=(x[:, 0] > 50).long()).loss.backward()
    opt.step()
    before = [a.delta_weight().clone() for a in h.adapters]
    events = h.step(opt, step=1)
    opt.zero_grad()
    grown = [e for e in events if e.grown]
    assert grown and sum(e.grown for e in events) == 4
    for e in grown:
        m = h.names.index(e.module)
        a = h.adapters[m]
        assert torch.equal(a.delta_weight(), before[m])  # B = 0 on new ranks: ΔW unchanged
        new = a.active_indices()[-e.grown:]
        for p, dim in ((a.lora_A, 0), (a.lora_B, 1)):
            st = opt.state[p]
            assert torch.count_nonzero(st["exp_avg"].index_select(dim, new)) == 0
            assert torch.count_nonzero(st["exp_avg_sq"].index_select(dim, new)) == 0
        assert torch.count_nonzero(a.lora_A[new]) > 0  # A drawn Kaiming-uniform


def test_everyone_loses_a_rank_shrinks_budget_under_the_papers_rule():
    # n_a = N (one per module) with r = 2, min_rank = 1: every module can lose at most one rank, so
    # the N weakest ranks are one per module — the paper's rule (keep_budget=False) adds nothing back
    model = tiny_bert()
    h = _handle(model, r=2, max_rank=4, k1=2, k2=2, n_rounds=1, total_steps=6, keep_budget=False)
    h.allocator.set_validation_batch(_val_batch(n=8))
    n = len(h.adapters)
    _train(h, model, 4)
    assert h.allocator.rounds_done == 1
    assert h.total_rank == 2 * n - n and h.allocator.budget_lost == n
    assert all(a.rank == 1 for a in h.adapters)


def test_default_keeps_the_budget_at_r2():
    # the same run with the default keep_budget=True: k modules lose one rank while the other n - k
    # (room 2 each) can take them back, k <= 2 (n - k) -> k = floor(2n / 3); the total rank is kept
    model = tiny_bert()
    h = _handle(model, r=2, max_rank=4, k1=2, k2=2, n_rounds=1, total_steps=6)
    h.allocator.set_validation_batch(_val_batch(n=8))
    n = len(h.adapters)
    _train(h, model, 4)
    assert h.allocator.rounds_done == 1
    assert h.total_rank == 2 * n and h.allocator.budget_lost == 0
    assert h.allocator.pruned_total == h.allocator.grown_total == (2 * n) // 3
    assert sorted(a.rank for a in h.adapters) != [2] * n  # ranks did move


def test_ablation_budget_caps_rounds():
    # 12 adapters at r = 2: a round is (1 + 2·24) × 8 = 392 example forward passes; training costs
    # 2 × T × 4 examples per step
    model = tiny_bert()
    h = _handle(model, k1=2, k2=2, n_rounds=5, total_steps=40, ablation_budget=1.0)
    h.allocator.set_validation_batch(_val_batch(n=8))
    al = h.allocator
    assert al.max_rounds() == 5 and len(al.planned_rounds()) == 5  # examples per step unknown: no cap
    al.set_step_examples(4)
    assert al.max_rounds() == 1  # 320 / 392 < 1: at least one round
    cost = al.expected_cost()
    assert cost == {"rounds": 1, "rounds_uncapped": 5, "masks": 49, "val_examples": 8,
                    "ablation_example_forwards": 392, "training_example_forwards": 320, "budget": 1.0}
    al.set_step_examples(10)
    assert al.max_rounds() == 2  # 800 // 392
    h.config.ablation_budget = 3.0
    assert al.max_rounds() == 5  # 2400 // 392 = 6, capped by n_rounds
    h.config.ablation_budget = None
    assert al.max_rounds() == 5
    with pytest.raises(ValueError, match="examples per step"):
        al.set_step_examples(0)
    with pytest.raises(ConfigError, match="ablation_budget"):
        elalora.ALoRAConfig(r=2, ablation_budget=0)
    # the cap drives the rounds of a plain loop
    model = tiny_bert()
    h = _handle(model, k1=2, k2=2, n_rounds=5, total_steps=12, ablation_budget=1.0)
    h.allocator.set_validation_batch(_val_batch(n=8))
    h.allocator.set_step_examples(8)  # 2 × 12 × 8 = 192 < 392: one round
    _train(h, model, 12)
    assert h.allocator.round_steps == [1]


def test_round_progress_bar_and_cost_line():
    from elalora.integrations.progress import RoundProgress, describe_cost

    lines = []
    prog = RoundProgress(log=lines.append, disable=True)
    model = tiny_bert()
    h = _handle(model)
    _randomise(h)
    h.allocator.set_validation_batch(_val_batch())
    h.allocator.progress = prog
    h.allocator.compute_scores(model)
    h.allocator.compute_scores(model)
    n_masks = 1 + 2 * h.total_rank
    assert len(lines) == 2 and lines[1].startswith(f"ALoRA round 2: {n_masks} masks in ")
    line = describe_cost({"rounds": 1, "rounds_uncapped": 8, "masks": 289, "val_examples": 32,
                          "ablation_example_forwards": 9248, "training_example_forwards": 640, "budget": 1.0})
    assert "1 round(s) × 289 masks × 32 held-out examples = 9,248" in line and "capped from 8 rounds" in line


def test_missing_validation_batch_raises():
    model = tiny_bert()
    h = _handle(model, k1=1, k2=1, n_rounds=1, total_steps=4)
    with pytest.raises(RuntimeError, match="set_validation_batch"):
        _train(h, model, 1)
    with pytest.raises(ValueError, match="labels"):
        h.allocator.set_validation_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long)})


def test_config_validation():
    with pytest.raises(ConfigError, match="min_rank"):
        elalora.ALoRAConfig(r=2, min_rank=3)
    with pytest.raises(ConfigError, match="k1"):
        elalora.ALoRAConfig(r=2, k1=50, total_steps=10)
    s = elalora.ALoRAConfig(r=2, k1=0.25, k2=0.1).resolve_schedule(100)
    assert (s.k1, s.k2) == (25, 10)
    assert elalora.ALoRAConfig(r=2, k1=0).resolve_schedule(100).k1 == 1


# -------------------------------------------------------------------------- (4) Trainer callback
class _Toy(Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 100, (n, 10), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def test_trainer_callback_runs_rounds(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    h = elalora.get_model(model, elalora.ALoRAConfig(r=2, max_rank=4, n_a=3, k1=2, k2=2, n_rounds=2,
                                                     modules_to_save=["classifier"], ablation_budget=None))
    val = _Toy(n=16, seed=1)
    h.allocator.set_validation_batch({"input_ids": val.x, "labels": val.y})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=5e-3,
                             num_train_epochs=1, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Toy())
    h.callback().attach(trainer)
    start = h.total_rank
    trainer.train()
    assert trainer.state.global_step == 8
    assert h.allocator.total_steps == 8
    assert h.allocator.round_steps == [1, 3]
    assert h.events and {e.step for e in h.events} == {1, 3}
    assert h.total_rank == start
    assert h.allocator.step_examples == 8  # set by the callback, for the ablation budget
    assert len(h.allocator.round_seconds) == 2 and all(x > 0 for x in h.allocator.round_seconds)
    logged = [e for e in trainer.state.log_history if "elalora/rounds" in e]
    assert logged and logged[-1]["elalora/rounds"] == 2
    assert sum(e["elalora/ranks_moved"] for e in logged) == 6
