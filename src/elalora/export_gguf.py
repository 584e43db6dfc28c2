"""llama.cpp LoRA adapter export (GGUF), written with the ``gguf`` package's ``GGUFWriter``.

What llama.cpp reads (``src/llama-adapter.cpp``, ``src/llama-graph.cpp``) and what
``convert_lora_to_gguf.py`` writes for a PEFT adapter, reproduced here from our own factors:

* metadata ``general.architecture`` (must equal the base model's), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
* per adapted weight ``W`` (GGUF name ``blk.N.attn_q.weight`` ...) two tensors
  ``blk.N.attn_q.weight.lora_a`` and ``.lora_b`` holding PEFT's ``lora_A`` (``r × in``) and
  ``lora_B`` (``out × r``) in PyTorch orientation (GGUF's ``ne`` is the reversed shape, so
  ``a.ne = [in, r]``, ``b.ne = [r, out]``, which is what llama.cpp validates);
* at run time ``y = W x + s · B (A x)`` with ``s = adapter_scale · alpha / b.ne[0]``, i.e. alpha
  over the tensor's **own** rank.

Because of that last rule an adapter whose modules have different ranks cannot carry one alpha
that is right for all of them unless every tensor has the same rank. So we always write the
uniform layout (:func:`elalora.persistence.uniform_lora_factors`): every module zero-padded to
``R = max rank``, the true scale folded into A, ``alpha = R``, hence ``s = 1`` exactly.

Llama-architecture decoders only: the GGUF conversion of a Llama base (``convert_hf_to_gguf.py``,
``LlamaModel.modify_tensors``) permutes the rows of ``q_proj`` and ``k_proj`` into llama.cpp's
rotary layout, and ``transformers`` undoes it when it loads a GGUF; the rows of our ``lora_B`` for
q/k get the same permutation (B's rows are W's rows), as the converter does for PEFT adapters.

The handle is taken by duck type, as in :mod:`elalora.persistence` (this module sits at its level,
below :mod:`elalora.model`, which offers it as ``AdaptiveModel.export_gguf``).

Imports: :mod:`elalora.persistence`, :mod:`elalora._handle`, :mod:`elalora._extras`,
:mod:`elalora.errors`; ``gguf`` lazily (the ``gguf`` extra).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ._extras import require
from ._handle import handle_of
from .errors import ExportError
from .persistence import uniform_lora_factors

__all__ = ["export_gguf", "llama_rope_permute", "GGUF_ARCHITECTURES", "GGUF_EXTRA"]

# Hugging Face model_type -> llama.cpp architecture name, for the types whose tensor layout we
# reproduce exactly (the rotary permutation of q/k above). Others: export PEFT and use llama.cpp's
# convert_lora_to_gguf.py.
GGUF_ARCHITECTURES = {"llama": "llama"}
GGUF_EXTRA = "gguf"  # pip install 'elalora[gguf]' (elalora._extras.PROVIDERS)


def llama_rope_permute(rows: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The row permutation of ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` (HF → GGUF q/k layout).

    Within each head the rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` (rotate-half pairs) become
    ``[x_0, y_0, x_1, y_1, ...]`` (llama.cpp's adjacent pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@torch.no_grad()
def export_gguf(handle, path: str | os.PathLike, *, name: str | None = None) -> dict:
    """Write ``path`` (a ``.gguf`` file, atomically): the adapter as a llama.cpp LoRA adapter.

    Uniform layout with ``alpha = R`` so that llama.cpp's ``alpha / rank`` is 1 (module docstring).
    Returns ``{"rank": R, "alpha": R, "tensors": {gguf_name: shape}}``. Raises :class:`ExportError` for a
    model whose architecture is not supported, adapted modules llama.cpp has no LoRA slot for, or
    modules trained in full (a GGUF LoRA adapter holds only A/B pairs)."""
    gguf = require("gguf", "GGUF export")
    handle = handle_of(handle)  # a handle or a wrapped model
    cfg = getattr(handle.model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} decoders; this model is "
                         f"{model_type!r}. Export --to peft --layout uniform and convert it with llama.cpp's "
                         "convert_lora_to_gguf.py")
    if handle.modules_to_save_names():
        raise ExportError(f"modules trained in full ({', '.join(handle.modules_to_save_names())}) cannot go into a "
                         "llama.cpp LoRA adapter (it holds only lora_a/lora_b pairs)")
    arch_name = GGUF_ARCHITECTURES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = int(cfg.num_hidden_layers)
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    tmap = gguf.get_tensor_name_map(arch, n_layers)

    top, factors = uniform_lora_factors(handle, torch.float32)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (la, lb) in factors.items():
        hf = module if module.startswith("model.") or module.startswith("lm_head") else f"model.{module}"
        gname = tmap.get_name(hf + ".weight", try_suffixes=(".weight", ".bias"))
        if gname is None or not gname.startswith("blk."):
            raise ExportError(f"adapted module {module!r} has no LoRA slot in llama.cpp's {arch_name} graph "
                             "(only the projections inside the blocks do); leave it out of target_modules")
        if module.endswith("q_proj"):
            lb = llama_rope_permute(lb, n_head, n_head)
        elif module.endswith("k_proj"):
            lb = llama_rope_permute(lb, n_head, n_kv)
        tensors[gname] = (la, lb)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch_name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(top))
        base = getattr(cfg, "_name_or_path", None)
        w.add_name(name or (f"{Path(str(base)).name} elalora LoRA" if base else "elalora LoRA"))
        shapes = {}
        for gname in sorted(tensors, key=_gguf_order):
            la, lb = tensors[gname]
            for suffix, t in ((".lora_a", la), (".lora_b", lb)):
                arr = t.detach().cpu().float().contiguous().numpy()
                w.add_tensor(gname + suffix, arr)
                shapes[gname + suffix] = tuple(arr.shape)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"rank": top, "alpha": float(top), "architecture": arch_name, "tensors": shapes}


def _gguf_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, name)
