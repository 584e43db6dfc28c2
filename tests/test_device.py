"""Device discipline and host synchronisations (issue 37; docs/large_models.md).

* Every tensor elalora makes names its device. With ``torch.set_default_device("meta")`` and the model
  on the CPU, a tensor created without ``device=`` lands on meta and the first op that reads it fails:
  the whole path runs that way here (every method, both forms, rounds, save, load, resume, exports,
  merge, the Trainer callback).
* A step syncs the device with the host at most once; a round a fixed number of times, whatever the
  number of matrices. On the CPU nothing syncs, so the test counts the operations that would: a
  ``TorchDispatchMode`` counts the aten ops that force a sync on an accelerator (scalar reads, ``nonzero``,
  boolean-mask indexing, ``unique``, ...), a ``TorchFunctionMode`` the Python-level reads that do not
  dispatch on a CPU tensor (``.cpu()``, ``.tolist()``, ``.to("cpu")``), and the library's transfer helpers
  (:func:`elalora.layers.to_host` / ``to_device``) count their transfers. Host-side code reads host data
  through numpy, so what is counted is an upper bound on the device syncs. On the CPU a host tensor and
  a device tensor cannot be told apart by value, so the test relies on the library's spelling: host
  tensors are made with the string ``"cpu"``, device tensors follow a parameter's ``.device``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from tolerances import assert_close
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import elalora
from elalora import AdaLoRAConfig, ALoRAConfig, ElaLoRAConfig
from elalora import layers as layers_mod

FORMS = ["lora", "svd"]


@contextlib.contextmanager
def meta_default():
    """Every tensor created without a device goes to meta; the previous default is always restored."""
    prev = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None if prev.type == "cpu" else prev)


@pytest.fixture(autouse=True)
def _default_device_restored():
    yield
    assert torch.get_default_device().type == "cpu" and torch.empty(1).device.type == "cpu"


def _batches(n, seed=0, vocab=100, bs=4, seq=9, lm=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g, device="cpu")
        lab = ids.clone() if lm else torch.randint(0, 2, (bs,), generator=g, device="cpu")
        out.append({"input_ids": ids, "labels": lab})
    return out


def _train(model, h, batches, opt):
    model.train()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()


def _config(method, form, **kw):
    if method == "elalora":
        return ElaLoRAConfig(r=2, form=form, tinit=2, tfinal=3, delta_t=2, b=2, k=2, **kw)
    return AdaLoRAConfig(r=2, form=form, tinit=2, tfinal=3, delta_t=2, **kw)


# ------------------------------------------------------------------------------------- meta device
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["elalora", "adalora"])
def test_whole_path_makes_no_tensor_on_the_default_device(method, form, tmp_path):
    import peft

    from elalora import load_checkpoint, save_checkpoint

    model, fresh, resumed, base = (tiny_bert(seed=1) for _ in range(4))
    batches, probe = _batches(16), _batches(1, 9)[0]
    with meta_default():
        h = elalora.get_model(model, _config(method, form, modules_to_save=["classifier"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        h.set_total_steps(16)
        _train(model, h, batches[:8], opt)
        save_checkpoint(tmp_path / "ckpt.pt", h, opt)
        _train(model, h, batches[8:], opt)
        assert h.events and {e.step for e in h.events} & set(range(8, 16)), "no round on both sides of the checkpoint"
        model.eval()
        with torch.no_grad():
            want = model(**probe).logits
        h.save_pretrained(str(tmp_path / "ad"))
        for layout in ("compact", "uniform"):
            h.export_peft(str(tmp_path / layout), layout=layout)
        h2 = elalora.load_adapter(fresh, str(tmp_path / "ad"))
        with torch.no_grad():
            got = fresh(**probe).logits
        # resume: a new handle and optimizer continue from the checkpoint and make the same decisions
        h3 = elalora.get_model(resumed, _config(method, form, modules_to_save=["classifier"]))
        opt3 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5e-3)
        h3.set_total_steps(16)
        load_checkpoint(tmp_path / "ckpt.pt", h3, opt3)
        _train(resumed, h3, batches[8:], opt3)
        h.merge()
        with torch.no_grad():
            merged = model(**probe).logits
        h.unmerge()
        unloaded = h.merge_and_unload()
        with torch.no_grad():
            after_unload = unloaded(**probe).logits
    assert want.device.type == "cpu" and h2.rank_pattern() == h.rank_pattern()
    assert_close(got, want)
    assert [e.to_dict() for e in h3.events] == [e.to_dict() for e in h.events]
    assert h3.rank_pattern() == h.rank_pattern()
    assert_close(merged, want)
    assert_close(after_unload, want)
    for layout in ("compact", "uniform"):  # PEFT itself is not asked to run with a meta default
        pm = peft.PeftModel.from_pretrained(tiny_bert(seed=1), str(tmp_path / layout)).eval()
        with torch.no_grad():
            assert_close(pm(**probe).logits, want)
    del base


def test_alora_and_gelora_make_no_tensor_on_the_default_device():
    from elalora.allocation.gelora import plan_gelora

    model, planned = tiny_bert(seed=2), tiny_bert(seed=3)
    batches = _batches(10, seed=4)
    plan_batches = _batches(8, seed=5, bs=16)
    with meta_default():
        h = elalora.get_model(model, ALoRAConfig(r=2, k1=2, k2=3, n_rounds=2, modules_to_save=["classifier"],
                                                 ablation_budget=None))
        h.allocator.set_validation_batch(batches[0])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        h.set_total_steps(10)
        _train(model, h, batches, opt)
        names = elalora.get_model(planned, ElaLoRAConfig(r=2, total_steps=10)).names
        plan = plan_gelora(planned, [{k: v for k, v in b.items() if k != "labels"} for b in plan_batches], names,
                           target_avg_rank=2)
    assert h.allocator.rounds_done == 2 and h.events
    assert sum(plan.rank_pattern.values()) == 2 * len(names)


def test_trainer_callback_and_gguf_export_make_no_tensor_on_the_default_device(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed=1)
    rows = [{"input_ids": b["input_ids"][i].tolist(), "labels": b["input_ids"][i].tolist()}
            for b in _batches(4, seed=6, bs=4, lm=True) for i in range(4)]
    ds = Dataset.from_list(rows)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=2,
                             learning_rate=5e-3, logging_steps=2, save_steps=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    with meta_default():
        h = elalora.get_model(model, ElaLoRAConfig(r=2, form="svd", tinit=1, tfinal=2, delta_t=1, b=2, k=2))
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    cb = h.callback().attach(trainer)
    # The Trainer's own code cannot run with a meta default (accelerate seeds its sampler with
    # torch.Generator(device=torch.get_default_device())), so each of the callback's hooks runs under it.
    for hook in ("on_train_begin", "on_step_begin", "on_optimizer_step", "on_log", "on_save"):
        def under_meta(*a, _f=getattr(cb, hook), **k):
            with meta_default():
                return _f(*a, **k)
        setattr(cb, hook, under_meta)
    trainer.train()
    assert (tmp_path / "run" / "checkpoint-4" / "elalora_state.pt").is_file()
    try:
        import gguf  # noqa: F401
    except ImportError:
        gguf = None
    if gguf is not None:
        with meta_default():
            info = h.export_gguf(str(tmp_path / "a.gguf"))
    assert h.events and h.step_count == 8
    if gguf is not None:
        assert (tmp_path / "a.gguf").is_file() and info["rank"] == max(h.rank_pattern().values())


# ------------------------------------------------------------------------------------- sync count
_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
             "aten.unique_consecutive", "aten.unique_dim", "aten.equal", "aten.is_nonzero", "aten.argwhere"}


class _SyncCounter(TorchDispatchMode):
    """Counts the aten ops that force a device→host sync on an accelerator."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        hit = name in _SYNC_OPS
        if name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            hit = True
        if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            idx = args[1] if len(args) > 1 else ()
            hit = any(torch.is_tensor(i) and i.dtype == torch.bool for i in (idx or ()))
        if hit:
            self.n += 1
            self.ops.append(name)
        return func(*args, **kwargs)


class _ReadCounter(TorchFunctionMode):
    """Counts the Python-level reads that do not dispatch on a CPU tensor but copy from an accelerator."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.ops: list[str] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__name__", "")
            hit = name in ("cpu", "tolist", "item")
            if name == "to":
                # ``.to("cpu")`` spelled as a string is a read to the host; ``.to(t.device)`` follows a tensor's
                # own device (on an accelerator a no-op or an upload, which the transfer helpers count)
                dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
                hit = isinstance(dev, str) and torch.device(dev).type == "cpu"
            if hit:
                self.n += 1
                self.ops.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(monkeypatch):
    """``{"ops": ..., "reads": ..., "to_host": ..., "to_device": ...}`` counters over the block."""
    syncs, reads = _SyncCounter(), _ReadCounter()
    counts = {"to_host": 0, "to_device": 0}
    real = layers_mod._move

    def move(tensors, targets, key):
        reads.paused = True  # the helper's own copy is counted as its transfers, not as a read
        before = layers_mod.TRANSFERS[key]
        try:
            return real(tensors, targets, key)
        finally:
            counts[key] += layers_mod.TRANSFERS[key] - before
            reads.paused = False

    monkeypatch.setattr(layers_mod, "_move", move)
    box: dict = {}
    with reads, syncs:
        yield box
    box.update(ops=syncs.n, reads=reads.n, **counts, op_names=syncs.ops + reads.ops)


def _round_due(h, t: int) -> bool:
    """Whether the allocator holds a round at step ``t`` (one that may decide to move nothing)."""
    alloc = h.allocator
    if alloc.method == "elalora":
        return alloc.is_round(t)
    final_t = alloc.schedule.total_steps - alloc.schedule.tfinal
    return t <= final_t and (alloc.budget(t)[1] or t == final_t)


def _counted_run(model, cfg, batches, monkeypatch):
    """Per step: ``(t, round due, total count, detail)`` of ``handle.step`` alone."""
    h = elalora.get_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    h.set_total_steps(len(batches))
    model.train()
    out = []
    for t, b in enumerate(batches):
        model(**b).loss.backward()
        opt.step()
        due = _round_due(h, t)
        with count_syncs(monkeypatch) as c:
            events = h.step(opt)
        total = c["ops"] + c["reads"] + c["to_host"] + c["to_device"]
        out.append((t, due, total, c))
        assert due or not events
        opt.zero_grad()
    return h, out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["elalora", "adalora"])
def test_a_step_syncs_at_most_once_and_a_round_a_constant_number_of_times(method, form, monkeypatch):
    per_size = {}
    for layers in (1, 4):
        model = tiny_bert(seed=5, layers=layers)
        kw = dict(b=4, k=2) if method == "elalora" else {}
        cls = ElaLoRAConfig if method == "elalora" else AdaLoRAConfig
        cfg = cls(r=2, form=form, tinit=2, tfinal=3, delta_t=1, **kw)
        h, rows = _counted_run(model, cfg, _batches(14, seed=layers), monkeypatch)
        plain = [n for _, ev, n, _ in rows if not ev]
        rounds = [n for _, ev, n, _ in rows if ev]
        assert rounds and h.events, "no round moved a rank"
        assert max(plain) <= 1, [(t, c["op_names"]) for t, ev, n, c in rows if not ev and n > 1]
        per_size[len(h.adapters)] = (max(rounds), rows)
    (m_small, (small, _)), (m_large, (large, rows)) = sorted(per_size.items())
    assert m_large >= 4 * m_small
    last = [c for _, due, _, c in rows if due][0]
    print(f"\n{method}/{form}: syncs per round {small} at {m_small} matrices, {large} at {m_large} matrices "
          f"(first round: sync ops {last['op_names']}, to_host {last['to_host']}, to_device {last['to_device']})")
    assert large == small, f"a round's syncs grow with the matrix count: {small} at {m_small}, {large} at {m_large}"
    # grad check + score table + (bases of the grown matrices) + one upload + the finite check
    assert large <= (5 if method == "elalora" else 4)


def test_to_host_and_to_device_copy_in_one_transfer_per_device_exactly():
    a = torch.tensor([1.5, -2.0], dtype=torch.float32)
    m = torch.tensor([True, False, True])
    i = torch.tensor([3, 2**40], dtype=torch.long)
    before = dict(layers_mod.TRANSFERS)
    out = layers_mod.to_host([a, m, i, torch.zeros(0)])
    assert layers_mod.TRANSFERS["to_host"] == before.get("to_host", 0) + 1
    for x, y in zip([a, m, i], out):
        assert x.dtype == y.dtype and torch.equal(x, y) and x.data_ptr() != y.data_ptr()
    back = layers_mod.to_device(out[:3], [torch.device("cpu")] * 3)
    assert layers_mod.TRANSFERS["to_device"] == before.get("to_device", 0) + 1
    assert all(torch.equal(x, y) for x, y in zip([a, m, i], back))


def test_the_packed_transfer_keeps_every_value_and_dtype():
    """What a GPU transfer runs (host to host takes plain copies, so the packing is pinned here directly):
    float32, bool and int64 beyond 2**24 packed in one buffer come back exact, as copies."""
    a = torch.tensor([1.5, -2.0, 3.25e-8], dtype=torch.float32)
    m = torch.tensor([True, False, True])
    i = torch.tensor([3, 2**40 + 1], dtype=torch.long)
    b = torch.tensor([[0.5, 2.0]], dtype=torch.bfloat16)
    out = layers_mod._packed([a, m, i, b, torch.zeros(0)], torch.device("cpu"))
    for x, y in zip([a, m, i, b], out):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) and x.data_ptr() != y.data_ptr()
    meta = layers_mod.to_device([a, m, i], [torch.device("meta")] * 3)  # a non-host target takes the packed path
    assert [t.device.type for t in meta] == ["meta"] * 3 and [t.dtype for t in meta] == [a.dtype, m.dtype, i.dtype]
