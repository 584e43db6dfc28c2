"""Gradient checkpointing and ``torch.compile`` with every adapter method (tiny random Llama).

* Gradient checkpointing (``model.gradient_checkpointing_enable()``) recomputes the blocks' forward
  passes in backward; the gradients, hence the scores, rounds and losses, are those of the plain run.
* ``torch.compile``: a rank change only flips values of the ``active`` mask buffer and of the slot
  parameters (shapes never change), so after the first compilation no rank change may recompile.
  A counting backend (``torch._dynamo.testing.CompileCounter``, which runs the captured graphs
  eagerly) counts every compiled frame.
"""

import pytest
import torch

import elalora

from conftest import tiny_llama

# Every method elalora's own adapters run; plain LoRA (and GeLoRA) train as PEFT's own LoRA since the
# redesign (issue 13), so their checkpointing/compile behaviour is PEFT's.
METHODS = ["elalora", "adalora", "alora"]
STEPS = 14


def _config(method):
    common = dict(target_modules=["q_proj", "v_proj", "down_proj"], seed=2, lora_dropout=0.0)
    if method == "elalora-svd":  # ElaLoRA on the SVD form (P·diag(λ)·Q): new ranks write rows of Q, columns of P
        return elalora.ElaLoRAConfig(r=2, b=1, k=1, tinit=2, tfinal=2, delta_t=2, form="svd", **common)
    if method == "elalora":  # the default, the LoRA form (B·diag(m)·A): new ranks write rows of A
        return elalora.ElaLoRAConfig(r=2, b=1, k=1, tinit=2, tfinal=2, delta_t=2, **common)
    if method == "adalora":
        return elalora.AdaLoRAConfig(init_r=3, r=1, tinit=2, tfinal=4, delta_t=2, **common)
    if method == "alora":
        return elalora.ALoRAConfig(r=2, max_rank=4, k1=2, k2=2, n_rounds=3, **common)
    raise ValueError(method)


def _run(method, *, checkpointing=False, compile_backend=None):
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    h = elalora.get_model(model, _config(method))
    h.set_total_steps(STEPS)
    if method == "alora":
        g = torch.Generator().manual_seed(9)
        ids = torch.randint(0, 100, (4, 10), generator=g)
        h.allocator.set_validation_batch({"input_ids": ids, "labels": ids})
    if checkpointing:  # transformers 5.25 renamed it (the old name warns until v6); older versions have only the old
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    net = torch.compile(model, backend=compile_backend) if compile_backend is not None else model
    opt = torch.optim.AdamW(h.adapter_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses, frames = [], []
    for _ in range(STEPS):
        ids = torch.randint(0, 100, (4, 10), generator=g)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
        frames.append(getattr(compile_backend, "frame_count", 0))
    events = [(e.step, e.module, e.old_rank, e.new_rank, e.pruned, e.grown) for e in h.events]
    return losses, events, frames


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_run(method):
    ref_losses, ref_events, _ = _run(method)
    losses, events, _ = _run(method, checkpointing=True)
    assert ref_events, "no rank change: the comparison would prove nothing"
    assert events == ref_events
    # Recomputation runs the same kernels on the same inputs: equal to float32 rounding.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS + ["elalora-svd"])
def test_rank_changes_do_not_recompile(method):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    ref_losses, ref_events, _ = _run(method)
    losses, events, frames = _run(method, compile_backend=counter)
    torch._dynamo.reset()
    assert ref_events, "no rank change: the comparison would prove nothing"
    assert events == ref_events
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    first_round = min((e[0] for e in events), default=STEPS - 1)
    assert frames[0] > 0, "nothing was compiled"
    # Everything is compiled at the first step; rounds (masks, slot values) must not add a frame.
    assert frames[-1] == frames[0], \
        f"recompiled after rank changes (frames per step: {frames}, first round {first_round})"
