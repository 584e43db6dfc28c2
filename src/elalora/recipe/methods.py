"""Method choices of a run: the elalora config of each method, PEFT's LoRA rank pattern, the
resolved schedule, the expected number of optimizer steps and the GeLoRA plan.

Imports: :mod:`.spec`, :mod:`elalora.allocation.gelora`, :mod:`elalora.errors`, tqdm, peft (lazily).
"""

from __future__ import annotations

import dataclasses
import math
import random

from ..allocation.gelora import plan_gelora
from ..errors import RunError
from .spec import METHOD_CONFIGS, PEFT_METHODS

__all__ = ["PEFT_METHODS", "GELORA_DEFAULTS", "build_method_config", "with_targets", "peft_rank_pattern",
           "schedule_dict", "expected_total_steps", "run_gelora_plan"]


def build_method_config(spec, targets, head):
    """The elalora config of ``spec.method`` (a :class:`~elalora.recipe.RunSpec`; validated: raises ConfigError).

    Only the knobs the spec gives are passed (:meth:`~elalora.recipe.spec.RunSpec.method_overrides`); every
    other field keeps the config's own default. ``gelora-elalora``: the plan's ``rank_pattern`` and a
    capacity of at least its largest planned rank."""
    m = spec.method
    if m not in METHOD_CONFIGS:
        raise RunError(f"unknown method {m!r}")
    kw = dict(r=spec.r, target_modules=targets, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
              modules_to_save=head, seed=spec.seed, **spec.method_overrides())
    return METHOD_CONFIGS[m](**kw)


def with_targets(config, targets, head, plan=None):
    """``config`` (built by :func:`build_method_config` before the model was loaded) with the resolved
    target modules and head and, for ``gelora-elalora``, the plan's ranks (capacity at least the largest
    planned rank); re-validated. The same object: the run builds its config once."""
    config.target_modules = targets
    config.modules_to_save = head
    if plan is not None and hasattr(config, "rank_pattern"):
        config.rank_pattern = dict(plan.rank_pattern)
        config.max_rank = max(config.max_rank, max(plan.rank_pattern.values()))
    config.__post_init__()  # idempotent: every check again, on the final values
    return config


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
    """The method's schedule for a run of ``total_steps`` steps, as config.json records it (the fields of
    :class:`~elalora.config.Schedule` or :class:`~elalora.config.ALoRASchedule`); ``None`` for a config
    without one. Raises ConfigError when the schedule does not fit the run."""
    if not hasattr(config, "resolve_schedule"):
        return None
    return dataclasses.asdict(config.resolve_schedule(int(total_steps)))


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


#: GeLoRA planning defaults (``elalora train --method gelora`` and ``elalora plan``): training examples whose
#: hidden states give the intrinsic dimensions, their pooling, and the scale alpha/r of every module (32: the
#: paper's).
GELORA_DEFAULTS = {"samples": 256, "pooling": "mean", "alpha_scale": 32.0}


def run_gelora_plan(model, train, collate, module_names, *, r: int | None, batch_size: int, seed: int,
                    samples: int | None = None, pooling: str | None = None, alpha_scale: float | None = None):
    """The GeLoRA plan of ``module_names`` (``None`` knobs: :data:`GELORA_DEFAULTS`)."""
    d = GELORA_DEFAULTS
    samples = d["samples"] if samples is None else samples
    pooling = d["pooling"] if pooling is None else pooling
    alpha_scale = d["alpha_scale"] if alpha_scale is None else alpha_scale
    n = min(samples, len(train))
    if n < 3:
        raise RunError(f"GeLoRA needs at least 3 training examples for the intrinsic dimensions; got {n}")
    sizes = {}
    for name in module_names:
        w = model.get_submodule(name).weight
        sizes[name] = min(int(w.shape[0]), int(w.shape[1]))
    if r is not None and r > max(sizes.values()):
        raise RunError(f"--r {r} exceeds the size of every adapted matrix "
                       f"(the widest allows rank {max(sizes.values())}); "
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
