"""Quantised (bitsandbytes 4-bit / 8-bit) base models: loading, preparation, dequantisation.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains low-rank adapters beside a frozen base whose
linear weights are stored in 4 bits (NF4 or FP4, ``bnb.nn.Linear4bit``) or 8 bits (LLM.int8(),
``bnb.nn.Linear8bitLt``). elalora wraps those layers as it wraps ``nn.Linear`` (both are
subclasses): the adapter takes its shape from the layer's logical ``in_features`` /
``out_features`` — never from the packed ``uint8`` / ``int8`` storage — and its parameters are kept
in fp32 beside the quantised weight, as PEFT does (``peft/tuners/lora/bnb.py``)::

    y = base4bit(x) + dropout(x) · (Q ⊙ (λ·m))ᵀ · Pᵀ · s        (P, λ, Q in fp32)

This module holds the few helpers the rest of the library needs for such bases:

* :func:`bnb_quantization_config` builds the ``transformers.BitsAndBytesConfig`` for
  ``--load-in-4bit`` / ``--load-in-8bit``; :func:`load_quantized_causal_lm` loads a causal LM with it
  (a folder, or a GGUF file through a temporary float copy);
* :func:`prepare_quantized_model` is ``peft.prepare_model_for_kbit_training`` (freeze the base, cast
  non-quantised half-precision parameters such as layer norms to fp32, optional gradient
  checkpointing with input gradients);
* :func:`is_quantized_layer` / :func:`dequantize_weight` (the dequantised ``d_out × d_in`` weight,
  following ``peft.utils.integrations.dequantize_bnb_weight``), used by ``merge_and_unload``;
* :func:`keep_standard_4bit_layout`, which :func:`elalora.get_model` applies to every adapted 4-bit
  base: bitsandbytes' CPU inference repacking (AVX512-BF16 CPUs) breaks later training steps.

bitsandbytes is an optional dependency (``pip install 'elalora[bnb]'``); nothing here imports it until
a quantised layer is actually met, and then through :func:`elalora._extras.require` (a missing install
fails with one line naming the extra).

Imports: torch; :mod:`elalora.errors`, :mod:`elalora._extras`; bitsandbytes, transformers and peft
lazily (level 1 of the import order, beside :mod:`elalora.layers`).
"""

from __future__ import annotations

import torch
from torch import nn

from ._extras import require
from .errors import QuantizationError

__all__ = [
    "QuantizationError", "allow_trainer_on_quantized_base", "is_quantized_layer", "quantization_kind",
    "dequantize_weight",
    "keep_standard_4bit_layout",
    "bnb_quantization_config", "prepare_quantized_model", "load_quantized_causal_lm",
]


def quantization_kind(layer: nn.Module) -> str | None:
    """``"4bit"`` (``Params4bit``), ``"8bit"`` (``Int8Params``), ``"other"`` (an integer weight of another
    scheme) or ``None`` (a float weight)."""
    w = getattr(layer, "weight", None)
    if w is None:
        return None
    cls = type(w).__name__
    if cls == "Params4bit":
        return "4bit"
    if cls == "Int8Params":
        return "8bit"
    if not (w.dtype.is_floating_point or w.dtype.is_complex):
        return "other"
    return None


def is_quantized_layer(layer: nn.Module) -> bool:
    """Whether the layer's weight is stored quantised (not a float tensor)."""
    return quantization_kind(layer) is not None


def original_dtype(layer: nn.Module) -> torch.dtype:
    """The float dtype the quantised weight stands for: the dtype it was quantised from (4-bit: the
    quant state's ``dtype``), else the bias dtype, else the layer's compute dtype, else fp32."""
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    if qs is not None and getattr(qs, "dtype", None) is not None:
        return qs.dtype
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.dtype.is_floating_point:
        return bias.dtype
    cd = getattr(layer, "compute_dtype", None)
    return cd if isinstance(cd, torch.dtype) else torch.float32


@torch.no_grad()
def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float ``d_out × d_in`` tensor (a copy for quantised layers).

    4-bit: ``bnb.functional.dequantize_4bit(packed, quant_state)``; 8-bit: the row-wise absmax
    dequantisation ``W = C · SCB / 127`` (``bnb.functional.int8_vectorwise_dequant``), as PEFT's
    ``dequantize_bnb_weight`` does. Float layers return their weight unchanged.
    """
    kind = quantization_kind(layer)
    w = layer.weight
    if kind is None:
        return w
    bnb = require("bitsandbytes", "to dequantise a 4-bit / 8-bit layer")
    if kind == "4bit":
        if _cpu_packed(w):
            return bnb.functional.dequantize_4bit(*_standard_layout(bnb, w))
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if kind == "8bit":
        scb = getattr(w, "SCB", None)
        state = getattr(layer, "state", None)
        if scb is None and state is not None:
            scb = state.SCB
        if scb is None:
            raise QuantizationError("this 8-bit layer holds no scale (SCB): it was not quantised yet; "
                                    "move the model to its device (or run a forward pass) first")
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))
    raise QuantizationError(f"cannot dequantise a {type(layer).__name__} with a {w.dtype} weight: only "
                            "bitsandbytes 4-bit and 8-bit layers are supported")


def _cpu_packed(weight) -> bool:
    """Whether bitsandbytes has repacked this 4-bit weight for its CPU inference kernel."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _standard_layout(bnb, w):
    """``(data, quant_state)`` of a CPU-repacked 4-bit weight in the standard layout, computing what the
    repacked layer computes, without changing the layer: bitsandbytes' inverse of the repacking on a
    shallow copy of the state, with the scales the repacked layer uses (bf16, stored
    ``(d_in / blocksize) × d_out``) kept as they are, in fp32 and the standard order. (bitsandbytes'
    own inverse re-quantises them, which moves every weight again.)"""
    import copy

    qs = copy.copy(w.quant_state)
    absmax = qs.absmax.T.reshape(-1).float()
    qs.original_nested = False  # stops the inverse from re-quantising the scales
    data, qs = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, qs)
    qs.absmax, qs.nested = absmax, False
    return data, qs


def keep_standard_4bit_layout(module: nn.Module) -> int:
    """Keep every ``bnb.nn.Linear4bit`` in ``module`` in bitsandbytes' standard layout; returns how many.

    bitsandbytes (≥ 0.49), on a CPU with AVX512-BF16, repacks a ``Linear4bit`` weight in place the
    first time the layer runs in eval mode without gradients (``_convert_weight_packed_for_cpu``: a
    blocked layout with bf16 scales, for its fused inference kernel). Measured with bitsandbytes 0.50.2:
    a repacked layer passes **no gradient to its input** in later training steps, so after the first
    evaluation of a train–evaluate–train loop every adapter below it stops learning; and its outputs
    move by the bf16 rounding of the scales (≈ 6e-3 on a 128-input layer), so evaluation no longer
    computes what training did. Adapter bases are trained and evaluated in turn, so
    :func:`load_quantized_causal_lm` calls this on the model it loads and :func:`elalora.get_model` on
    every adapted 4-bit base: it clears ``support_avx512bf16_for_cpu`` (the flag that repacking reads)
    and puts a layer already repacked back in the standard layout, keeping the bf16 scales it computed
    with (as fp32, no longer double-quantised), so its outputs stay what they were. The cost is
    bitsandbytes' faster CPU inference kernel; call it on a PEFT model too, to evaluate a base exactly
    as it trained. Layers of other types are left alone.
    """
    n = 0
    for layer in module.modules():
        if quantization_kind(layer) != "4bit":
            continue
        w = layer.weight
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
        if _cpu_packed(w):
            bnb = require("bitsandbytes", "to restore a 4-bit layer's layout")
            w.data, w.quant_state = _standard_layout(bnb, w)
        n += 1
    return n


_TRAINABLE_QUANTIZERS: dict[type, type] = {}


def allow_trainer_on_quantized_base(model: nn.Module) -> None:
    """Let ``transformers.Trainer`` (and TRL's trainers) accept a quantised model carrying elalora adapters.

    ``Trainer.__init__`` refuses a model whose ``is_quantized`` is set unless it is a ``PeftModel`` or
    its quantizer is QAT-trainable ("You cannot perform fine-tuning on purely quantized models"): the
    check exists to stop training with no adapters at all. :func:`elalora.get_model` calls this on a
    quantised base. It changes only this model's quantizer *instance* (its class becomes a subclass whose
    ``is_qat_trainable`` is true, the one flag that check reads and that nothing else in transformers,
    accelerate, PEFT or TRL reads); the base weights stay frozen and quantised.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is None or getattr(q, "is_qat_trainable", False):
        return
    cls = type(q)
    sub = _TRAINABLE_QUANTIZERS.get(cls)
    if sub is None:
        name = f"ElaLoRATrainable{cls.__name__}"
        sub = type(name, (cls,), {"is_qat_trainable": property(lambda self: True), "__module__": __name__,
                                  "__doc__": f"{cls.__name__} whose model carries trainable elalora adapters."})
        globals()[name] = sub  # importable by name, so the model still pickles
        _TRAINABLE_QUANTIZERS[cls] = sub
    q.__class__ = sub


def bnb_quantization_config(bits: int, *, compute_dtype: torch.dtype = torch.float32, quant_type: str = "nf4",
                            double_quant: bool = True):
    """A ``transformers.BitsAndBytesConfig`` for a ``bits``-bit base (4: NF4/FP4 with ``compute_dtype``
    matmuls and, by default, double quantisation of the scales, as in QLoRA; 8: LLM.int8())."""
    require("bitsandbytes", "4-bit and 8-bit bases")
    from transformers import BitsAndBytesConfig

    if bits == 4:
        if quant_type not in ("nf4", "fp4"):
            raise QuantizationError(f"4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizationError(f"bits must be 4 or 8, got {bits}")


def prepare_quantized_model(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Ready a quantised model for adapter training (call it before :func:`elalora.get_model`).

    This is ``peft.prepare_model_for_kbit_training``: every base parameter is frozen, non-quantised
    fp16/bf16 parameters (layer norms, embeddings, head) are cast to fp32 for stable training, and with
    ``gradient_checkpointing`` the model's checkpointing is enabled with input gradients switched on
    (so the frozen embeddings still pass a gradient into the first checkpointed block).
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def load_quantized_causal_lm(path: str, bits: int, *, compute_dtype: torch.dtype = torch.float32,
                             gradient_checkpointing: bool = False, gguf_file: str | None = None,
                             **from_pretrained_kw) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, quantization_config=…)`` for a ``bits``-bit base,
    prepared by :func:`prepare_quantized_model`, its 4-bit layers kept in the standard layout
    (:func:`keep_standard_4bit_layout`).

    transformers takes one ``quantization_config`` per load, and a GGUF checkpoint already uses it
    (``GgufConfig``). So a GGUF file is loaded in float first (dequantised), written with
    ``save_pretrained`` to a temporary folder next to nothing else, and that folder is loaded
    quantised (the temporary copy is removed afterwards).
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    qcfg = bnb_quantization_config(bits, compute_dtype=compute_dtype)
    from_pretrained_kw.setdefault("dtype", compute_dtype)
    if gguf_file:
        from transformers import GgufConfig

        float_model = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf_file, quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
            dtype=from_pretrained_kw["dtype"])
        if getattr(float_model, "hf_quantizer", None) is not None:
            float_model.hf_quantizer = None
        if hasattr(float_model.config, "quantization_config"):
            delattr(float_model.config, "quantization_config")
        with tempfile.TemporaryDirectory(prefix="elalora-gguf-") as tmp:
            float_model.save_pretrained(tmp)
            del float_model
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qcfg, **from_pretrained_kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, **from_pretrained_kw)
    keep_standard_4bit_layout(model)  # before any forward pass: evaluation computes what training does
    return prepare_quantized_model(model, gradient_checkpointing=gradient_checkpointing)
