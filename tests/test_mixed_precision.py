"""Mixed precision on the CPU, end to end through the Hugging Face Trainer (issue 37; docs/large_models.md).

* bf16 autocast (``TrainingArguments(bf16=True)``) and a bf16 base (``model.to(torch.bfloat16)``, fp32
  adapters), both forms: scores and rounds stay finite, the schedule (which steps are rounds, how many
  ranks each moves, the total rank) equals float32's, and the export reloads in plain PEFT with the
  outputs elalora computes.
* fp16 autocast with ``torch.amp.GradScaler("cpu")``: an overflowing step that the scaler skips changes
  no score, no rank and no counter but the step count (SPEC §2: skip the update).

Which rank moves where may differ from float32: the scores are products of gradients, and a bf16
forward pass changes them by about 1e-2 relative, so ranks whose scores are that close can swap.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from tolerances import assert_close

import elalora
from elalora import ElaLoRAConfig

FORMS = ["lora", "svd"]
STEPS = 10


def _rows(n=40, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, 100, (n, 9), generator=g, device="cpu")
    lab = torch.randint(0, 2, (n,), generator=g, device="cpu")
    return [{"input_ids": ids[i].tolist(), "labels": int(lab[i])} for i in range(n)]


def _fit(model, form, tmp, *, bf16: bool):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    h = elalora.get_model(model, ElaLoRAConfig(r=2, form=form, tinit=2, tfinal=2, delta_t=2, b=2, k=2,
                                               modules_to_save=["classifier"]))
    args = TrainingArguments(output_dir=str(tmp), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
                             bf16=bf16, use_cpu=True, report_to=[], disable_tqdm=True, seed=0, save_strategy="no",
                             logging_steps=100, data_seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()))
    h.callback().attach(trainer)
    trainer.train()
    return h


def _schedule(h):
    by_step: dict[int, int] = {}
    for e in h.events:
        by_step[e.step] = by_step.get(e.step, 0) + e.pruned
    return by_step


def _decisions(h):
    return {(e.step, e.module, e.pruned, e.grown) for e in h.events}


def _probe():
    return torch.randint(0, 100, (3, 9), generator=torch.Generator(device="cpu").manual_seed(7), device="cpu")


@pytest.mark.parametrize("form", FORMS)
def test_bf16_autocast_and_bf16_base_through_the_trainer(form, tmp_path):
    import peft

    ref = _fit(tiny_bert(seed=1), form, tmp_path / "fp32", bf16=False)
    auto = _fit(tiny_bert(seed=1), form, tmp_path / "auto", bf16=True)
    base = tiny_bert(seed=1).to(torch.bfloat16)
    half = _fit(base, form, tmp_path / "base", bf16=False)
    assert all(p.dtype == torch.float32 for p in half.adapter_parameters())
    for h in (auto, half):
        assert h.events and h.step_count == STEPS
        assert all(bool(torch.isfinite(s).all()) for s in h.importance.rank_scores())
        assert all(bool(torch.isfinite(s).all()) for s in h.importance.sens + h.importance.unc)
        assert _schedule(h) == _schedule(ref), "the rounds (steps, ranks moved) do not depend on the precision"
        assert h.total_rank == ref.total_rank
        same = len(_decisions(h) & _decisions(ref)) / len(_decisions(ref) | _decisions(h))
        print(f"\n{form}: {'autocast' if h is auto else 'bf16 base'}: {same:.0%} of the per-module decisions "
              "equal float32's")
    x = _probe()
    # the export of the autocast run: plain PEFT on the float32 base computes elalora's outputs. The Trainer
    # (accelerate) leaves the model's forward wrapped in bf16 autocast, so both run under it: bf16 tolerance.
    auto.model.eval()
    auto.export_peft(str(tmp_path / "peft_auto"))
    pm = peft.PeftModel.from_pretrained(tiny_bert(seed=1), str(tmp_path / "peft_auto")).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = auto.model(input_ids=x).logits
        got = pm(input_ids=x).logits
    assert_close(got.float(), want.float(), dtype=torch.bfloat16)
    # the bf16 base: plain PEFT on a fresh bf16 base, at bf16's tolerance
    half.model.eval()
    with torch.no_grad():
        want = half.model(input_ids=x).logits
    assert want.dtype == torch.bfloat16
    half.export_peft(str(tmp_path / "peft_half"))
    pm = peft.PeftModel.from_pretrained(tiny_bert(seed=1).to(torch.bfloat16), str(tmp_path / "peft_half")).eval()
    with torch.no_grad():
        got = pm(input_ids=x).logits
    assert_close(got.float(), want.float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("form", FORMS)
def test_fp16_gradscaler_skipped_steps_change_nothing_but_the_step_count(form):
    model = tiny_bert(seed=2)
    h = elalora.get_model(model, ElaLoRAConfig(r=2, form=form, tinit=1, tfinal=1, delta_t=1, b=2, k=2,
                                               total_steps=12, modules_to_save=["classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    # a scale so large that the fp16 backward overflows: the scaler skips and halves it until it fits
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    g = torch.Generator(device="cpu").manual_seed(3)
    model.train()
    skipped_steps = []
    for t in range(12):
        x = torch.randint(0, 100, (4, 9), generator=g, device="cpu")
        y = torch.randint(0, 2, (4,), generator=g, device="cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=x, labels=y).loss
        scaler.scale(loss).backward()
        before = (None if h.importance.sens is None else [s.clone() for s in h.importance.sens + h.importance.unc],
                  h.rank_pattern(), h.importance.num_updates, len(h.events))
        scale = scaler.get_scale()
        scaler.step(opt)
        events = h.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:  # the scaler found inf/NaN gradients and skipped optimizer.step
            skipped_steps.append(t)
            state, pattern, n_upd, n_ev = before
            assert events == [] and len(h.events) == n_ev and h.rank_pattern() == pattern
            assert h.importance.num_updates == n_upd
            if state is not None:
                assert all(torch.equal(a, b) for a, b in zip(state, h.importance.sens + h.importance.unc))
        assert h.step_count == t + 1  # the schedule counts the step either way
        opt.zero_grad()
    assert skipped_steps and h.importance.num_skipped == len(skipped_steps)
    assert h.importance.num_updates == 12 - 1 - len(skipped_steps)  # no update in the final phase (t = 11)
    assert h.events, "rounds after the scaler settled moved ranks"
    assert all(bool(torch.isfinite(s).all()) for s in h.importance.rank_scores())
