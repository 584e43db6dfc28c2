"""elalora: adaptive-rank LoRA (ElaLoRA, AdaLoRA, ALoRA, GeLoRA) for PyTorch and Hugging Face models.

Quick start::

    import elalora
    handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=8, modules_to_save=["classifier"]))
    trainer = transformers.Trainer(model=model, ...)
    handle.callback().attach(trainer)
    trainer.train()
    handle.export_peft("out/peft")        # a plain PEFT LoRA adapter

The package, top (may import everything below it) to bottom (imports nothing of the package)::

    cli/                      argument translation over the recipe          needs elalora[cli]
    recipe/                   RunSpec -> build -> fit -> RunResult (HF Trainer runs)
    tasks/, plots/            data, collators, metrics; figures and tables  elalora[tasks], [plots]
    model                     AdaptiveModel, get_model, load_adapter
    persistence, allocation/, importance, integrations/ (callback, distributed),
    serving, export_gguf      which LoRA consumers read an export right; llama.cpp GGUF adapters
    targets                   default targets, the name-matching and block-index rules
    layers, config            the adapter maths; validated method configs
    errors, _io, _extras, _handle

``import elalora`` imports only what ``import peft, transformers`` already does (a test checks it).
Imports here: the core modules (model and below), never tasks/, plots/, recipe/ or cli/.
"""

from ._extras import quiet_optional_imports

quiet_optional_imports()  # before anything imports bitsandbytes (transformers' Trainer -> peft does): _extras

# E402 on purpose: these imports must come after quiet_optional_imports() above, so do not hoist them
from .allocation.base import RankEvent  # noqa: E402
from .config import AdaLoRAConfig, ALoRAConfig, ElaLoRAConfig  # noqa: E402
from .errors import (AdapterLoadError, ConfigError, ElaLoRAError, ExportError,  # noqa: E402
                     MissingExtraError, QuantizationError, TargetModuleError, TaskError)
from .layers import ElasticAdapter, GatedLoRAAdapter, SVDAdapter  # noqa: E402
from .model import AdaptiveModel, get_model, handle_of, load_adapter  # noqa: E402
from .checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from .persistence import export_peft, merge_and_unload, save_adapter  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig", "ALoRAConfig", "ElaLoRAConfig",
    "ElaLoRAError", "ConfigError", "TargetModuleError", "AdapterLoadError", "TaskError", "MissingExtraError",
    "ExportError",
    "QuantizationError",
    "ElasticAdapter", "SVDAdapter", "GatedLoRAAdapter",
    "AdaptiveModel", "get_model", "handle_of", "RankEvent",
    "save_adapter", "load_adapter", "export_peft", "merge_and_unload",
    "save_checkpoint", "load_checkpoint",
]
