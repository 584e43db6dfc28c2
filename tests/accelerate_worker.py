"""Worker for tests/test_distributed.py: HF Trainer + elalora callback, under `accelerate launch` or alone.

    accelerate launch --cpu --num_processes 2 tests/accelerate_worker.py OUT.pt
    python tests/accelerate_worker.py OUT.pt
"""
import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
import elalora  # noqa: E402
from elalora.integrations.distributed import rank_pattern_digest  # noqa: E402

from conftest import tiny_bert  # noqa: E402

GLOBAL_BATCH = 8


class Toy(Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 100, (n, 10), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def main(out):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    model = tiny_bert(seed=0)
    handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=0.15, tfinal=0.25, delta_t=2,
                                                           seed=3, modules_to_save=["classifier"]))
    args = TrainingArguments(output_dir=os.path.dirname(out) + f"/trainer-{world}",
                             per_device_train_batch_size=GLOBAL_BATCH // world,
                             learning_rate=5e-3, num_train_epochs=2, logging_steps=100, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                             ddp_backend="gloo" if world > 1 else None, dataloader_num_workers=0,
                             # transformers multiplies the loss by the world size when the model accepts
                             # loss kwargs, even if (like BERT's classifier) it returns a per-batch mean:
                             # that doubles the gradients under 2 processes and changes clipping.
                             average_tokens_across_devices=False)
    trainer = Trainer(model=model, args=args, train_dataset=Toy())
    handle.callback(check_consistency=True).attach(trainer)
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save({"pattern": handle.rank_pattern(), "events": [e.to_dict() for e in handle.events],
                    "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                    "digest": rank_pattern_digest(handle, include_weights=True), "world": world,
                    "steps": trainer.state.global_step}, out)


if __name__ == "__main__":
    main(sys.argv[1])
