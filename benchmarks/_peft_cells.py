"""The PEFT baseline cells the recipe has no method for: PEFT AdaLoRA and PEFT LoRA with EVA initialisation.

Both run through the public recipe, so that only the adapter differs from a recipe run: the data, base model,
head, pooling, target modules and collator of :func:`elalora.recipe.prepare`, and the Trainer setup and final
evaluation of :func:`elalora.recipe.fit` (on :meth:`elalora.recipe.Built.from_peft_model`).

* PEFT AdaLoRA at budget r: init_r ceil(1.5 r) → target_r r, lora_alpha 16, t_i 10 %, t_f 20 %, Δt given
  (5 % of the steps in every study), β 0.85, orthogonal regulariser 0.1; ``update_and_allocate`` from a
  ``TrainerCallback.on_optimizer_step``. Causal LMs are evaluated by generation, as the recipe does.
* PEFT LoRA + EVA (Paischer et al. 2024, arXiv:2410.07170): ``init_lora_weights="eva"``, ``EvaConfig(rho=2)``
  (PEFT's defaults otherwise: tau 0.99; no label mask, the labels are class ids): the A matrices and a rank
  pattern (≤ 2r per matrix, r on average) from an incremental SVD of each layer's inputs over the training
  batches, then LoRA training at lora_alpha 2r.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time


def peft_prepare(fields: dict):
    """:func:`elalora.recipe.prepare` for a PEFT cell whose adapters are built here: data, base model with the
    task's head, pooling, target modules and collator exactly as a recipe run of ``fields``. ``method`` is
    ``lora`` for prepare only (no method knob applies); ``epochs`` 1 and ``logging_steps`` steps/5 are what these
    cells have always used (max_steps sets the run's length)."""
    from elalora.recipe import RunSpec, prepare
    from elalora.recipe.loading import quiet_transformers

    quiet_transformers()
    steps = fields["max_steps"]
    return prepare(RunSpec(**{**fields, "method": "lora", "epochs": 1.0, "logging_steps": max(1, steps // 5)}))


def _config_dict(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def fit_peft(prep, pm, cfg, callbacks=()) -> dict:
    """Train and evaluate the PEFT model ``pm`` (built on ``prep.model``) with :func:`elalora.recipe.fit`: the
    recipe's collator, Trainer, arguments and final evaluation, plus ``callbacks``. The cell's record fields."""
    import torch

    from elalora.recipe import Built, fit

    with tempfile.TemporaryDirectory(prefix="acc-peft-") as tmp:
        fitted = fit(prep, Built.from_peft_model(pm, _config_dict(cfg)), tmp, callbacks=list(callbacks))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return {"final": fitted.final, "main_metric": prep.task.metric_names[0],
            "steps": int(fitted.trainer.state.global_step), "train_runtime_s": round(fitted.train_runtime, 2),
            "trainable_params": trainable, "active_params": trainable, "threads": torch.get_num_threads()}


def peft_adalora(prep, *, r: int, steps: int, delta_t: float) -> dict:
    """Wrap ``prep.model`` (:func:`peft_prepare`) in PEFT AdaLoRA at budget ``r`` (the module docstring's knobs;
    Δt = ``delta_t`` × steps), train and evaluate it; the cell's record fields."""
    import torch
    from peft import AdaLoraConfig, get_peft_model
    from transformers import TrainerCallback

    names, head, seed = prep.module_names, prep.head, prep.spec.seed
    task_type = "CAUSAL_LM" if prep.task.kind == "generation" else "SEQ_CLS"
    init_r = math.ceil(1.5 * r)
    tinit, tfinal, dt = round(0.1 * steps), round(0.2 * steps), max(1, round(delta_t * steps))
    cfg = AdaLoraConfig(init_r=init_r, target_r=r, lora_alpha=16, lora_dropout=0.0, tinit=tinit, tfinal=tfinal,
                        deltaT=dt, total_step=steps, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
                        target_modules=list(names), modules_to_save=head, task_type=task_type)
    torch.manual_seed(seed)
    pm = get_peft_model(prep.model, cfg)

    class UpdateAndAllocate(TrainerCallback):
        calls = 0

        def on_optimizer_step(self, args, state, control, **kw):  # after optimizer.step(), grads still there
            pm.base_model.update_and_allocate(state.global_step)
            UpdateAndAllocate.calls += 1

    res = fit_peft(prep, pm, cfg, callbacks=[UpdateAndAllocate()])
    pattern = pm.peft_config["default"].rank_pattern or {}
    final_ranks = {k: int(sum(v)) for k, v in pattern.items()}
    active = res["trainable_params"]
    if final_ranks:  # adapter params of the kept ranks + the rest (head); pattern keys are inner-model names
        inner = dict(pm.base_model.model.named_parameters())
        adapter_all = sum(p.numel() for n, p in inner.items() if p.requires_grad and "lora_" in n)
        kept = 0
        for n, pA in inner.items():
            if ".lora_A." not in n:
                continue
            rk = final_ranks.get(n.replace("lora_A", "lora_E"), init_r)
            kept += rk * (pA.shape[1] + inner[n.replace("lora_A", "lora_B")].shape[0] + 1)
        active = res["trainable_params"] - adapter_all + kept
    res.update({"active_params": active, "total_rank": sum(final_ranks.values()) if final_ranks else None,
                "n_matrices": len(names),
                "rank_pattern": {k.removeprefix("model.").replace(".lora_E", "").replace(".default", ""): v
                                 for k, v in final_ranks.items()},
                "update_and_allocate_calls": UpdateAndAllocate.calls, "method_config": _config_dict(cfg),
                "schedule": {"total_steps": steps, "tinit": tinit, "tfinal": tfinal, "delta_t": dt},
                "runner": "benchmarks/_peft_cells.py (PEFT AdaLoRA, same Trainer setup)"})
    return res


def peft_lora_eva(prep, *, r: int) -> dict:
    """PEFT LoRA with EVA initialisation on ``prep.model`` (module docstring), then the recipe's Trainer setup."""
    import torch
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    names, head, seed = prep.module_names, prep.head, prep.spec.seed
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(names), modules_to_save=head,
                     task_type="SEQ_CLS", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, use_label_mask=False))
    torch.manual_seed(seed)
    pm = get_peft_model(prep.model, cfg, low_cpu_mem_usage=True)
    loader = torch.utils.data.DataLoader(prep.train, batch_size=prep.spec.batch_size, shuffle=True,
                                         collate_fn=prep.collate, generator=torch.Generator().manual_seed(seed))
    t0 = time.time()
    initialize_lora_eva_weights(pm, loader, show_progress_bar=sys.stderr.isatty())
    eva_s = time.time() - t0
    # the ranks EVA assigned, read off the layers (rank_pattern lists only the matrices that differ from r)
    pattern = {n.removeprefix("base_model.model."): int(m.r["default"]) for n, m in pm.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    res = fit_peft(prep, pm, cfg)
    res.update({"eva_seconds": round(eva_s, 1), "rank_pattern": pattern, "total_rank": sum(pattern.values()),
                "n_matrices": len(names), "method_config": _config_dict(cfg),
                "runner": "benchmarks/_peft_cells.py (PEFT LoRA + EVA, same Trainer setup)"})
    return res
