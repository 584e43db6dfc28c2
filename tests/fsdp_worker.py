"""Worker for tests/test_fsdp.py: the plain loop under FSDP2 (``fully_shard``, gloo, CPU) or in one process.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTDIR [FORM]   # 2 processes, half the global batch each
    python tests/fsdp_worker.py OUTDIR [FORM]                        # one process, the whole global batch

FORM: the adapter form, ``svd`` (default; with the orthogonal regulariser, γ = 0.1) or ``lora`` (γ = 0:
the LoRA form has no regulariser).

Writes OUTDIR/result.pt (rank 0 only) and, from the trained model, OUTDIR/adapter (elalora format),
OUTDIR/peft (PEFT export) and OUTDIR/ckpt.pt (training checkpoint), each written once by rank 0; then
restores the checkpoint into a fresh (sharded) model and optimizer and records whether they match.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import elalora  # noqa: E402
from elalora.integrations.distributed import assert_replicas_agree, rank_pattern_digest  # noqa: E402
from elalora.layers import full_tensor  # noqa: E402
from elalora.checkpoints import save_checkpoint  # noqa: E402
from elalora.persistence import export_peft, save_adapter  # noqa: E402

from conftest import tiny_llama  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 24, 8, 10
# SGD's learning rate per form. The LoRA form starts from PEFT's Kaiming A (|a| ≲ 1/√d_in = 0.18, nine
# times the SVD form's 0.02) and so takes larger steps: at 0.5 its dynamics amplify rounding, and even
# one process summing the same gradients in two halves ends 1e-1 away on the weights (at 0.2: 1e-7).
LR = {"svd": 0.5, "lora": 0.2}
POISON_STEP = 5  # a step with an importance update and no round


def norm_trainable(model) -> None:
    """The final norm is trained "in full" (a module outside the adapters, as a classifier head would be), but
    at learning rate 0 (see :func:`optimizer`): it only carries the non-finite gradient of POISON_STEP."""
    model.model.norm.weight.requires_grad_(True)


def optimizer(model, form: str) -> torch.optim.Optimizer:
    """SGD with momentum, as in the DDP test: per-element state that rounds must zero, and no division by
    sqrt(v) that would amplify the reduce-scatter's summation-order differences on tiny gradients. The
    final norm sits in a group of its own at lr 0, so that its gradient changes no weight."""
    norm = model.model.norm.weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not norm]
    return torch.optim.SGD([{"params": rest}, {"params": [norm], "lr": 0.0}], lr=LR[form], momentum=0.9)


def config(form: str = "svd") -> elalora.ElaLoRAConfig:
    """The worker's method config; tests/test_fsdp.py builds the same one to load the checkpoint."""
    return elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=4, tfinal=6, delta_t=2, total_steps=STEPS, seed=11, form=form,
                                 orth_reg_weight=0.1 if form == "svd" else 0.0)


def main(out: str, form: str = "svd") -> None:
    out = Path(out)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    cfg = config(form)
    handle = elalora.get_model(model, cfg)
    norm_trainable(model)
    assert {a.kind for a in handle.adapters} == {form}
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert all(type(p).__name__ == "DTensor" for _, p, _ in handle.adapters[0].slot_parameters())
    torch.manual_seed(1000 + rank)  # processes' global RNGs differ on purpose: decisions must not depend on them
    opt = optimizer(model, form)
    g = torch.Generator().manual_seed(5)
    model.train()
    losses = []
    for t in range(STEPS):
        x = torch.randint(0, 100, (GLOBAL_BATCH, SEQ), generator=g)
        per = GLOBAL_BATCH // world
        xs = x[rank * per:(rank + 1) * per]
        loss = model(input_ids=xs, labels=xs).loss  # includes orth_reg_weight · R (forward hook; svd form)
        loss.backward()
        opt.step()
        if t == POISON_STEP:
            # what a grad scaler's skipped step looks like: a non-finite gradient on a module trained in full
            # (here only in the last element, i.e. in the last process's shard). Every process must skip.
            grad = model.model.norm.weight.grad
            local = grad.to_local() if distributed else grad
            if rank == world - 1:
                local[-1] = float("inf")
        events = handle.step(opt)
        if events:
            assert_replicas_agree(handle)
        opt.zero_grad()
        # FSDP2 averages gradients over processes: the global loss is the mean of the per-process means.
        lt = loss.detach().clone()
        if distributed:
            dist.all_reduce(lt)
            lt /= world
        losses.append(float(lt))
    assert_replicas_agree(handle, include_weights=True)
    digest = rank_pattern_digest(handle, include_weights=True)
    # Persistence from the sharded model: every process calls (the adapter tensors are gathered),
    # rank 0 writes.
    save_adapter(handle, out / "adapter")
    export_peft(handle, out / "peft")
    save_checkpoint(out / "ckpt.pt", handle, opt)
    params = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    resumed = _resume_matches(out / "ckpt.pt", cfg, opt, digest, distributed)
    if rank == 0:
        torch.save({"pattern": handle.rank_pattern(), "events": [e.to_dict() for e in handle.events],
                    "params": params, "losses": losses, "masks": [a.active.clone() for a in handle.adapters],
                    "digest": digest, "world": world, "resumed": resumed, "form": form,
                    "skipped": handle.importance.num_skipped}, out / "result.pt")
    if distributed:
        dist.destroy_process_group()


def _resume_matches(ckpt, cfg, opt, digest, distributed) -> bool:
    """A fresh (sharded) model and optimizer restored from the checkpoint equal the trained ones."""
    from elalora.checkpoints import load_checkpoint

    model = tiny_llama(seed=0)
    handle = elalora.get_model(model, cfg)
    norm_trainable(model)
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt2 = optimizer(model, cfg.form)
    load_checkpoint(ckpt, handle, opt2)
    same = rank_pattern_digest(handle, include_weights=True) == digest and handle.step_count == STEPS
    bufs = lambda o: [full_tensor(o.state[p]["momentum_buffer"]) for g in o.param_groups for p in g["params"]]  # noqa: E731
    return bool(same and all(torch.equal(a, b) for a, b in zip(bufs(opt), bufs(opt2))))


if __name__ == "__main__":
    main(*sys.argv[1:3])
