"""The Hugging Face Trainer callback: once per optimizer step, logging, checkpoint state."""


import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import elalora
from elalora.integrations.trainer import STATE_FILE

from conftest import tiny_bert


class Toy(Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 100, (n, 10), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=5e-3,
                num_train_epochs=1, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("form", ["svd", "lora"])
def test_trainer_grad_accumulation_changes_ranks(tmp_path, form):
    model = tiny_bert()
    cfg = elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=0.2, tfinal=0.2, delta_t=0.1, modules_to_save=["classifier"],
                                form=form)
    h = elalora.get_model(model, cfg)
    assert {a.kind for a in h.adapters} == {form}
    calls = []
    orig = h.step
    h.step = lambda opt=None, step=None: (calls.append(step), orig(opt, step=step))[1]
    trainer = Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2, num_train_epochs=2),
                      train_dataset=Toy())
    h.callback().attach(trainer)
    start = h.rank_pattern()
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 8  # 64 examples / (8 × 2) × 2 epochs
    assert calls == list(range(steps))  # once per optimizer step, never per micro-batch
    assert h.allocator.total_steps == steps  # T taken from the Trainer
    assert h.events and h.total_rank == 3 * len(h.adapters)
    assert any(e.new_rank != e.old_rank for e in h.events)
    logged = [e for e in trainer.state.log_history if "elalora/total_rank" in e]
    assert logged and all(e["elalora/total_rank"] == 3 * len(h.adapters) for e in logged)
    assert sum(e["elalora/ranks_moved"] for e in logged) == h.allocator.moved
    del start


def test_trainer_checkpoint_holds_state_and_resume_restores_it(tmp_path):
    def run(resume=None, max_steps=None):
        model = tiny_bert()
        cfg = elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=2, tfinal=2, delta_t=2, modules_to_save=["classifier"])
        h = elalora.get_model(model, cfg)
        args = _args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=5, logging_steps=100)
        trainer = Trainer(model=model, args=args, train_dataset=Toy())
        h.callback().attach(trainer)
        if max_steps is not None:  # simulate an interruption after a checkpoint was written
            class Stop(__import__("transformers").TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step >= max_steps:
                        control.should_training_stop = True
            trainer.add_callback(Stop())
        trainer.train(resume_from_checkpoint=resume)
        return h, model

    h_full, m_full = run()
    ckpt = tmp_path / "out" / "checkpoint-5"
    assert (ckpt / STATE_FILE).is_file()
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert state["step_count"] == 5 and state["importance"]["sens"] is not None
    h_res, m_res = run(resume=str(ckpt))
    assert [e.to_dict() for e in h_res.events] == [e.to_dict() for e in h_full.events]
    assert h_res.rank_pattern() == h_full.rank_pattern()
    for (n, a), b in zip(m_full.named_parameters(), m_res.parameters()):  # resume identity is exact
        assert torch.equal(a, b), n
