"""The chunked, grouped importance update (elalora.importance) against the plain reference formula
of SPEC §2, over many steps, mixed shapes, several chunk sizes, None grads, resets and reloads."""

import pytest
import torch
from torch import nn

import elalora.importance as imp
from elalora.importance import ImportanceTracker
from elalora.layers import GatedLoRAAdapter, SVDAdapter

from tolerances import assert_close


class RefTracker:
    """SPEC §2 written out per tensor, in float64."""

    def __init__(self, adapters, b1=0.85, b2=0.85):
        self.params = [p for a in adapters for _, p, _ in a.slot_parameters()]
        self.dims = [d for a in adapters for _, _, d in a.slot_parameters()]
        self.n = [len(a.slot_parameters()) for a in adapters]
        self.b1, self.b2 = b1, b2
        self.sens = [torch.zeros(p.shape, dtype=torch.float64) for p in self.params]
        self.unc = [torch.zeros(p.shape, dtype=torch.float64) for p in self.params]

    def update(self):
        for k, p in enumerate(self.params):
            ipt = torch.zeros(p.shape, dtype=torch.float64) if p.grad is None else (p.double() * p.grad.double()).abs()
            self.sens[k] = self.b1 * self.sens[k] + (1 - self.b1) * ipt
            self.unc[k] = self.b2 * self.unc[k] + (1 - self.b2) * (ipt - self.sens[k]).abs()

    def reset(self, flat_lo, n, slots):
        for k in range(flat_lo, flat_lo + n):
            idx = torch.tensor(slots)
            self.sens[k].index_fill_(self.dims[k], idx, 0.0)
            self.unc[k].index_fill_(self.dims[k], idx, 0.0)

    def scores(self):
        out, k = [], 0
        for n in self.n:
            tot = 0
            for j in range(n):
                s = self.sens[k + j] * self.unc[k + j]
                dim = self.dims[k + j]
                tot = tot + (s if s.dim() == 1 else s.mean(dim=1 - dim))
            out.append(tot)
            k += n
        return out


def _adapters(kind="svd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (24, 16), (16, 24), (40, 8), (16, 24), (8, 40), (33, 7)]
    out = []
    for i, (din, dout) in enumerate(shapes):
        cap = 4 + (i % 3 == 0) * 2
        cls = SVDAdapter if kind == "svd" else GatedLoRAAdapter
        a = cls(nn.Linear(din, dout), r=3, capacity=cap, lora_alpha=8, generator=g)
        with torch.no_grad():
            for _, p, _ in a.slot_parameters():
                p.normal_(generator=g)
        out.append(a)
    return out


def _grads(adapters, g, none_every=0, step=0):
    for i, a in enumerate(adapters):
        for _, p, _ in a.slot_parameters():
            if none_every and (i + step) % none_every == 0:
                p.grad = None
            else:
                p.grad = torch.randn(p.shape, generator=g)


def _close(a, b):
    """The fused float32 update against the float64 reference: float32's tolerance."""
    assert_close(a, b, dtype=torch.float32)


@pytest.mark.parametrize("chunk", [1, 64, 1 << 19])
@pytest.mark.parametrize("kind", ["svd", "lora"])
def test_update_and_scores_match_reference(monkeypatch, chunk, kind):
    monkeypatch.setattr(imp, "CPU_CHUNK_ELEMENTS", chunk)
    ads = _adapters(kind)
    tr, ref = ImportanceTracker(ads, 0.8, 0.7), RefTracker(ads, 0.8, 0.7)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        _grads(ads, g, none_every=3, step=step)
        with torch.no_grad():  # parameters move between steps, as after optimizer.step()
            for a in ads:
                for _, p, _ in a.slot_parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        assert tr.update()
        ref.update()
        for s, r in zip(tr.sens, ref.sens):
            _close(s, r)
        for u, r in zip(tr.unc, ref.unc):
            _close(u, r)
        for s, r in zip(tr.rank_scores(), ref.scores()):
            assert s.dtype == torch.float32 and s.device.type == "cpu"
            _close(s, r)
        if step == 5:  # a round resets some slots: the cached scores stay exact
            lo = 0
            for m, a in enumerate(ads):
                n = len(a.slot_parameters())
                if m in (1, 4):
                    tr.reset_slots(m, [0, 2])
                    ref.reset(lo, n, [0, 2])
                lo += n
            for s, r in zip(tr.rank_scores(), ref.scores()):
                _close(s, r)
    assert tr.num_updates == 12
    assert tr.state_bytes() == 2 * sum(p.numel() * 4 for a in ads for _, p, _ in a.slot_parameters())


def test_scores_recomputed_after_state_edit_and_reload():
    ads = _adapters()
    tr = ImportanceTracker(ads)
    g = torch.Generator().manual_seed(2)
    _grads(ads, g)
    tr.update()
    expect = [s.clone() for s in tr.rank_scores()]
    sd = tr.state_dict()
    tr2 = ImportanceTracker(ads)
    tr2.load_state_dict(sd)
    for a, b in zip(tr2.rank_scores(), expect):
        assert_close(a, b)
    # editing the state in place and dropping the cache gives scores of the edited state
    tr.sens[1].mul_(2.0)
    tr._scores = None
    got = tr.rank_scores()[0]
    el = [s * u for s, u in zip(tr.sens[:3], tr.unc[:3])]
    assert_close(got, el[1] + el[2].mean(1) + el[0].mean(0))
    # returned score lists are not mutated by later resets
    before = tr.rank_scores()
    snap = before[0].clone()
    tr.reset_slots(0, [1])
    assert torch.equal(before[0], snap) and tr.rank_scores()[0][1] == 0


def test_non_finite_skip_leaves_state_and_scores_untouched():
    ads = _adapters()
    tr = ImportanceTracker(ads)
    g = torch.Generator().manual_seed(3)
    _grads(ads, g)
    tr.update()
    sens = [s.clone() for s in tr.sens]
    scores = [s.clone() for s in tr.rank_scores()]
    _grads(ads, g)
    ads[-1].lora_Q.grad[0, 0] = float("nan")
    assert tr.update() is False and tr.num_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(sens, tr.sens))
    assert all(torch.equal(a, b) for a, b in zip(scores, tr.rank_scores()))


def test_state_follows_dtype_change():
    ads = _adapters()
    tr = ImportanceTracker(ads)
    g = torch.Generator().manual_seed(4)
    _grads(ads, g)
    tr.update()
    before = [s.clone() for s in tr.sens]
    for a in ads:
        a.double()
    for a in ads:
        for _, p, _ in a.slot_parameters():
            p.grad = torch.randn(p.shape, generator=g).double()
    assert tr.update()
    assert all(s.dtype == torch.float64 for s in tr.sens)
    assert tr.num_updates == 2 and not torch.equal(tr.sens[0].float(), before[0])
