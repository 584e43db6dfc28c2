"""Worker for tests/test_distributed.py: the plain loop under DDP (gloo, CPU) or in one process.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT.pt [FORM]   # 2 replicas, half the global batch each
    python tests/ddp_worker.py OUT.pt [FORM]                        # one process, the whole global batch

FORM: the adapter form, ``svd`` (default) or ``lora``.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import elalora  # noqa: E402
from elalora.integrations.distributed import assert_replicas_agree, rank_pattern_digest  # noqa: E402

from conftest import tiny_bert  # noqa: E402

STEPS, GLOBAL_BATCH = 24, 8


def main(out: str, form: str = "svd") -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    torch.set_num_threads(1)
    model = tiny_bert(seed=0)
    cfg = elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=4, tfinal=6, delta_t=2, total_steps=STEPS, seed=11,
                                modules_to_save=["classifier"], form=form)
    handle = elalora.get_model(model, cfg)
    assert {a.kind for a in handle.adapters} == {form}
    torch.manual_seed(1000 + rank)  # replicas' global RNGs differ on purpose: decisions must not depend on them
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    # SGD with momentum: per-element optimizer state that rounds must zero for changed slots, and no
    # division by sqrt(v) that would blow the all-reduce's ~1e-7 summation-order differences up on
    # near-zero gradients (with AdamW, weights of freshly grown ranks differed by up to 6e-3).
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    model.train()
    for t in range(STEPS):
        x = torch.randint(0, 100, (GLOBAL_BATCH, 10), generator=g)
        y = (x[:, 0] > 50).long()
        per = GLOBAL_BATCH // world
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        net(input_ids=xs, labels=ys).loss.backward()
        opt.step()
        events = handle.step(opt)
        if events:
            assert_replicas_agree(handle)
        opt.zero_grad()
    assert_replicas_agree(handle, include_weights=True)
    digest = rank_pattern_digest(handle, include_weights=True)
    if rank == 0:
        torch.save({"pattern": handle.rank_pattern(), "events": [e.to_dict() for e in handle.events],
                    "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                    "masks": [a.active.clone() for a in handle.adapters], "digest": digest, "world": world,
                    "form": form}, out)
    if distributed:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        assert len(set(digests)) == 1, digests
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
