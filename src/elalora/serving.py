"""Which LoRA consumers read a PEFT LoRA export correctly, and why (pure functions, no I/O).

An adaptive-rank adapter has a different rank per module. PEFT reads that exactly through
``rank_pattern`` / ``alpha_pattern``; the serving engines each apply their own, simpler rule
(read from their sources):

==============  ==========================================================================
consumer        what it does with ``adapter_config.json`` and the ``lora_A`` / ``lora_B`` tensors
==============  ==========================================================================
PEFT            ``ΔW_m = (alpha_m / r_m) · B_m A_m`` with ``r_m`` / ``alpha_m`` from the
                patterns (top-level ``r`` / ``lora_alpha`` otherwise); the tensors must have
                rank ``r_m``.
vLLM            ``vllm/lora/peft_helper.py``: one scale ``lora_alpha / r`` (``/ sqrt(r)`` with
                rsLoRA) for every module, patterns ignored; ``r`` is checked against
                ``--max-lora-rank`` and each module's tensors are copied into max-rank slots.
                ``modules_to_save`` and DoRA are refused.
TGI / LoRAX     ``server/.../adapters/lora.py``: ``lora_alpha / r`` folded into B, then A and B
                ``torch.stack``-ed per layer type (all layers must have one shape); a layer
                type missing from any layer is skipped for the whole model. Only
                ``lora_A`` / ``lora_B`` are loaded.
SGLang          one adapter-wide ``lora_alpha / r``; adapters with non-default
                ``rank_pattern`` / ``alpha_pattern`` are refused; no ``modules_to_save``.
llama.cpp       ``convert_lora_to_gguf.py`` keeps only the top-level ``lora_alpha``;
                ``src/llama-adapter.cpp`` scales each tensor by ``alpha / (its own rank)``.
                Tensors other than lora_A/B (modules saved in full) stop the converter.
==============  ==========================================================================

So the compact export (``r == lora_alpha``, ``alpha_m == r_m``, scale 1 everywhere) is right in
PEFT and vLLM but not in llama.cpp (a module of rank ``r_m`` gets ``r / r_m``), TGI (stacking
fails on uneven ranks, a rank-0 module dropped from one layer disables that type everywhere) or
SGLang (patterns refused). The uniform export (every tensor at rank ``R``, ``r = lora_alpha = R``,
no patterns) gives scale 1 under every rule.

Imports: the standard library only (it reads a config dict and tensor shapes; ``elalora inspect``
passes them from the files).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

__all__ = ["ConsumerVerdict", "CONSUMERS", "peft_module_shapes", "serving_report", "format_serving_report"]

CONSUMERS = ("peft", "vllm", "tgi/lorax", "sglang", "llama.cpp")
_REL = 1e-6  # scales are ratios of small integers / floats: equal to float precision or not at all


@dataclass(frozen=True)
class ConsumerVerdict:
    """Whether ``consumer`` applies exactly the update PEFT applies, with the reason in one line."""

    consumer: str
    ok: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def peft_module_shapes(shapes: dict[str, list[int] | tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {"A": shape, "B": shape}}`` from safetensors tensor shapes (``base_model.model.`` prefix dropped)."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        for tag, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                           (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B")):
            if name.endswith(tag):
                out.setdefault(name[: -len(tag)], {})[which] = tuple(int(d) for d in shape)
                break
    return out


def _pattern_value(pattern: dict, module: str):
    """PEFT's lookup: a key matches a module whose full name is the key or ends with ``.key`` (or the key as regex)."""
    if module in pattern:
        return pattern[module]
    for key, v in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})$", module):
            return v
    return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL, abs_tol=0.0)


def _layer_and_type(module: str) -> tuple[str | None, str]:
    """``("3", "self_attn.q_proj")`` for ``model.layers.3.self_attn.q_proj``: the layer is the last integer
    in the name, the type what follows it (so BERT's three ``...dense`` modules stay apart)."""
    parts = module.split(".")
    i = next((j for j in range(len(parts) - 2, -1, -1) if parts[j].isdigit()), None)
    return (None, module) if i is None else (parts[i], ".".join(parts[i + 1:]))


@dataclass
class _Export:
    """What every consumer rule reads from one PEFT LoRA export (see :func:`serving_report`)."""

    modules: dict[str, dict[str, tuple[int, ...]]]
    r_top: int
    alpha_top: float
    rank_pat: dict
    alpha_pat: dict
    rslora: bool
    dora: bool
    saved: list[str]
    extra: list[str]  # tensors that are not lora_A / lora_B (modules saved in full)
    peft_scale: dict[str, float] = field(default_factory=dict)  # PEFT's alpha_m / r_m, the reference
    rank: dict[str, int] = field(default_factory=dict)  # each module's tensor rank (rows of A)
    bad_shape: list[str] = field(default_factory=list)  # tensor rank != configured r_m

    def rule(self, alpha: float, r: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.rank.values()))

    @property
    def rank_txt(self) -> str:
        ranks = self.ranks
        return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}"

    @property
    def global_scale(self) -> float:
        return self.rule(self.alpha_top, self.r_top)

    @property
    def wrong_global(self) -> list[str]:
        """Modules whose PEFT scale differs from the one global ``lora_alpha / r``."""
        return [m for m in self.modules if not _close(self.peft_scale[m], self.global_scale)]


def _read_export(config: dict, shapes: dict[str, list[int] | tuple[int, ...]]) -> _Export:
    ex = _Export(modules=peft_module_shapes(shapes), r_top=int(config.get("r") or 8),
                 alpha_top=float(config.get("lora_alpha") or 8), rank_pat=config.get("rank_pattern") or {},
                 alpha_pat=config.get("alpha_pattern") or {}, rslora=bool(config.get("use_rslora")),
                 dora=bool(config.get("use_dora")), saved=list(config.get("modules_to_save") or []),
                 extra=[k for k in shapes if not any(t in k for t in (".lora_A.", ".lora_B."))])
    # PEFT: per-module r_m, alpha_m; the tensors must have rank r_m
    for m, ab in ex.modules.items():
        r_m = _pattern_value(ex.rank_pat, m)
        r_m = int(r_m) if r_m is not None else ex.r_top
        a_m = _pattern_value(ex.alpha_pat, m)
        a_m = float(a_m) if a_m is not None else ex.alpha_top
        ex.peft_scale[m] = ex.rule(a_m, r_m)
        ex.rank[m] = ab.get("A", (0,))[0]
        if ex.rank[m] != r_m or ab.get("B", (0, 0))[-1] != r_m:
            ex.bad_shape.append(m)
    return ex


def _peft(ex: _Export) -> ConsumerVerdict:
    if ex.bad_shape:
        m = ex.bad_shape[0]
        return ConsumerVerdict("peft", False, f"{m}: tensor rank {ex.rank[m]} differs from its configured r "
                                              f"({len(ex.bad_shape)} modules); PEFT cannot load it")
    return ConsumerVerdict("peft", True, "per-module r and alpha from rank_pattern/alpha_pattern"
                           if ex.rank_pat or ex.alpha_pat else "one r and lora_alpha for every module")


def _vllm(ex: _Export) -> ConsumerVerdict:
    """vLLM: global alpha/r, patterns ignored, slots of max rank r."""
    g, wrong = ex.global_scale, ex.wrong_global
    if ex.dora:
        return ConsumerVerdict("vllm", False, "vLLM refuses DoRA")
    if ex.saved:
        return ConsumerVerdict("vllm", False, f"vLLM refuses modules_to_save ({', '.join(ex.saved)})")
    if wrong:
        m = wrong[0]
        return ConsumerVerdict("vllm", False, f"global lora_alpha/r = {g:g} but {m} needs {ex.peft_scale[m]:g} "
                                              f"({len(wrong)} modules wrong); patterns are ignored")
    if max(ex.ranks) > ex.r_top:
        return ConsumerVerdict("vllm", False, f"a tensor of rank {max(ex.ranks)} exceeds r = {ex.r_top} "
                                              "(--max-lora-rank check)")
    return ConsumerVerdict("vllm", True, f"global lora_alpha/r = {g:g} is every module's scale; {ex.rank_txt} "
                                         f"fit the r = {ex.r_top} slots")


def _tgi(ex: _Export) -> ConsumerVerdict:
    """TGI / LoRAX: global scale folded into B, ``torch.stack`` per layer type."""
    g, wrong = ex.global_scale, ex.wrong_global
    by_type: dict[str, dict[str, int]] = {}
    for m in ex.modules:
        layer, typ = _layer_and_type(m)
        by_type.setdefault(typ, {})[layer] = ex.rank[m]
    layers = {layer for t in by_type.values() for layer in t}
    uneven = [t for t, d in by_type.items() if len(set(d.values())) > 1]
    missing = [t for t, d in by_type.items() if set(d) != layers]
    if wrong:
        m = wrong[0]
        return ConsumerVerdict("tgi/lorax", False, f"global lora_alpha/r = {g:g} folded into B but {m} needs "
                                                   f"{ex.peft_scale[m]:g} ({len(wrong)} modules wrong)")
    if uneven:
        t = uneven[0]
        return ConsumerVerdict("tgi/lorax", False, f"{t} has ranks {sorted(set(by_type[t].values()))} across "
                                                   "layers: torch.stack of the per-layer tensors fails")
    if missing:
        t = missing[0]
        return ConsumerVerdict("tgi/lorax", False, f"{t} is missing from {len(layers - set(by_type[t]))} layer(s): "
                                                   f"the whole {t} type is skipped")
    if ex.extra:
        return ConsumerVerdict("tgi/lorax", False, f"only lora_A/lora_B are loaded: {len(ex.extra)} tensors saved "
                                                   f"in full ({', '.join(ex.saved) or ex.extra[0]}) would be missing")
    return ConsumerVerdict("tgi/lorax", True, f"global lora_alpha/r = {g:g}; every layer type has one shape "
                                              f"({ex.rank_txt})")


def _sglang(ex: _Export) -> ConsumerVerdict:
    """SGLang: one adapter-wide scale, non-default patterns refused."""
    if ex.rank_pat or ex.alpha_pat:
        return ConsumerVerdict("sglang", False, "rank_pattern/alpha_pattern are not supported (adapter refused)")
    if ex.wrong_global or len(ex.ranks) > 1:
        return ConsumerVerdict("sglang", False, f"one adapter-wide scale lora_alpha/r but {ex.rank_txt}")
    if ex.saved or ex.extra:
        return ConsumerVerdict("sglang", False, f"tensors saved in full ({', '.join(ex.saved) or ex.extra[0]}) "
                                                "are not loaded")
    return ConsumerVerdict("sglang", True, f"one adapter-wide scale {ex.global_scale:g}, every module at rank "
                                           f"{ex.ranks[0]}")


def _llama_cpp(ex: _Export) -> ConsumerVerdict:
    """llama.cpp: alpha / (rank of the tensor)."""
    own = {m: ex.alpha_top / ex.rank[m] for m in ex.modules if ex.rank[m] > 0}
    wrong_own = [m for m in own if not _close(own[m], ex.peft_scale[m])]
    if ex.rslora:
        return ConsumerVerdict("llama.cpp", False, "rsLoRA's alpha/sqrt(r) is not llama.cpp's alpha/rank")
    if ex.extra:
        return ConsumerVerdict("llama.cpp", False, f"convert_lora_to_gguf.py stops at tensors that are not "
                                                   f"lora_A/lora_B ({', '.join(ex.saved) or ex.extra[0]})")
    if wrong_own:
        m = wrong_own[0]
        return ConsumerVerdict("llama.cpp", False, f"alpha/own rank = {ex.alpha_top:g}/{ex.rank[m]} = {own[m]:g} "
                                                   f"for {m} but it needs {ex.peft_scale[m]:g} "
                                                   f"({len(wrong_own)} modules wrong)")
    return ConsumerVerdict("llama.cpp", True, f"alpha/own rank = each module's scale ({ex.rank_txt}, "
                                              f"alpha {ex.alpha_top:g})")


def serving_report(config: dict, shapes: dict[str, list[int] | tuple[int, ...]]) -> list[ConsumerVerdict]:
    """Which of :data:`CONSUMERS` read a PEFT LoRA export exactly as PEFT does (module docstring).

    ``config`` is the export's ``adapter_config.json``; ``shapes`` maps tensor names of
    ``adapter_model.safetensors`` to their shapes (the header is enough). The reference update is
    PEFT's, ``ΔW_m = (alpha_m / r_m) B_m A_m``; a consumer is "ok" when its own scale rule gives
    the same factor for every module and it accepts the file's shapes and extra tensors."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return [ConsumerVerdict(c, c == "peft", f"a PEFT {config.get('peft_type')} adapter, not LoRA")
                for c in CONSUMERS]
    ex = _read_export(config, shapes)
    if not ex.modules:
        return [ConsumerVerdict(c, False, "no lora_A / lora_B tensors") for c in CONSUMERS]
    return [check(ex) for check in (_peft, _vllm, _tgi, _sglang, _llama_cpp)]


def format_serving_report(verdicts: list[ConsumerVerdict]) -> str:
    """One line per consumer: ``  vllm       ok     reason``."""
    width = max(len(v.consumer) for v in verdicts)
    return "\n".join(f"  {v.consumer:<{width}}  {'ok' if v.ok else 'WRONG':<5}  {v.reason}" for v in verdicts)
