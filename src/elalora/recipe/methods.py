"""Method choices of a run: the elalora config of each method, PEFT's LoRA rank pattern, the
resolved schedule, the expected number of optimizer steps and the GeLoRA plan.

Imports: :mod:`elalora.config`, :mod:`elalora.allocation.gelora`, :mod:`elalora.errors`, tqdm, peft (lazily).
"""

from __future__ import annotations

import math
import random

from ..allocation.gelora import plan_gelora
from ..config import AdaLoRAConfig, ALoRAConfig, ElaLoRAConfig
from ..errors import RunError

__all__ = ["PEFT_METHODS", "build_method_config", "peft_rank_pattern", "schedule_dict", "expected_total_steps",
           "run_gelora_plan"]

PEFT_METHODS = ("lora", "gelora")  # trained as PEFT's own LoRA (plain LoRA has this one path)


def build_method_config(spec, targets, head, *, rank_pattern=None, max_planned: int | None = None):
    """The elalora config of ``spec.method`` (a :class:`~elalora.recipe.RunSpec`; validated: raises ConfigError)."""
    common = dict(r=spec.r, target_modules=targets, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                  modules_to_save=head, seed=spec.seed)
    scored = dict(tinit=spec.tinit, tfinal=spec.tfinal, delta_t=spec.delta_t, beta1=spec.beta1, beta2=spec.beta2,
                  orth_reg_weight=spec.orth_reg_weight, budget=spec.budget)
    if spec.form is not None:
        scored["form"] = spec.form
    m = spec.method
    if m == "adalora":
        return AdaLoRAConfig(init_r=spec.init_r, **common, **scored)
    if m in ("elalora", "gelora-elalora"):
        max_rank = spec.max_rank
        if m == "gelora-elalora" and max_planned is not None:
            max_rank = max(max_rank or 2 * spec.r, 2 * spec.r, max_planned)
        grace = {} if spec.grace_rounds is None else {"grace_rounds": spec.grace_rounds}
        return ElaLoRAConfig(b=spec.b, k=spec.k, min_rank=spec.min_rank, max_rank=max_rank,
                             rank_pattern=rank_pattern, **grace, **common, **scored)
    if m == "alora":
        return ALoRAConfig(n_rounds=spec.alora_rounds, k1=spec.alora_k1, k2=spec.alora_k2, max_rank=spec.max_rank,
                           val_batch_size=spec.alora_val_size, min_rank=spec.min_rank,
                           ablation_budget=spec.alora_budget, ablation_chunk=spec.alora_chunk,
                           keep_budget=spec.alora_keep_budget, **common)
    raise RunError(f"unknown method {m!r}")


def peft_rank_pattern(peft_model) -> dict[str, int]:
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    out = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer):
            r = mod.r.get("default") if isinstance(mod.r, dict) else None
            if r:
                out[name] = int(r)
    return out


def schedule_dict(config, total_steps: int) -> dict | None:
    if hasattr(config, "resolve_schedule") and config.method in ("elalora", "adalora"):
        s = config.resolve_schedule(int(total_steps))
        return {"total_steps": s.total_steps, "tinit": s.tinit, "tfinal": s.tfinal, "delta_t": s.delta_t}
    if config.method == "alora":
        k1, k2 = config.resolve_schedule(int(total_steps))
        return {"total_steps": int(total_steps), "k1": int(k1), "k2": int(k2), "n_rounds": config.n_rounds}
    return None


def expected_total_steps(n_train: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return int(max_steps)
    batches = math.ceil(n_train / batch_size)
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return int(math.ceil(epochs * per_epoch))


def _gelora_batches(examples: list[dict], collate, n: int, batch_size: int, seed: int):
    rng = random.Random(seed)
    pool = list(examples)
    if len(pool) > n:
        pool = rng.sample(pool, n)
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(pool), batch_size), desc="GeLoRA hidden states", leave=False, dynamic_ncols=True):
        batch = collate(pool[i:i + batch_size])
        batch.pop("labels", None)
        yield batch


def run_gelora_plan(model, train, collate, module_names, *, r: int | None, samples: int, pooling: str,
                    batch_size: int, seed: int, alpha_scale: float = 32.0):
    n = min(samples, len(train))
    if n < 3:
        raise RunError(f"GeLoRA needs at least 3 training examples for the intrinsic dimensions; got {n}")
    sizes = {}
    for name in module_names:
        w = model.get_submodule(name).weight
        sizes[name] = min(int(w.shape[0]), int(w.shape[1]))
    if r is not None and r > max(sizes.values()):
        raise RunError(f"--r {r} exceeds the size of every adapted matrix (the widest allows rank {max(sizes.values())}); "
                       f"lower --r")
    try:
        plan = plan_gelora(model, _gelora_batches(train, collate, n, batch_size, seed), module_names, pooling=pooling,
                           target_avg_rank=r, alpha_scale=alpha_scale)
    except ValueError as e:
        raise RunError(f"GeLoRA planning failed: {' '.join(str(e).split())}; try more --gelora-samples or "
                       "--gelora-pooling mean") from None
    over = [(m, k, sizes[m]) for m, k in plan.rank_pattern.items() if m in sizes and k > sizes[m]]
    if over:
        m, k, lim = over[0]
        raise RunError(f"the GeLoRA plan for --r {r} gives module {m!r} rank {k}, more than its matrix size {lim} "
                       f"({len(over)} module(s) over); lower --r")
    return plan
