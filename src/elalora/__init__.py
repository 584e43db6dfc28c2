"""elalora: adaptive-rank LoRA (ElaLoRA, AdaLoRA, ALoRA, GeLoRA) for PyTorch and Hugging Face models.

Quick start::

    import elalora
    handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=8, modules_to_save=["classifier"]))
    trainer = transformers.Trainer(model=model, ...)
    handle.callback().attach(trainer)
    trainer.train()
    handle.export_peft("out/peft")        # a plain PEFT LoRA adapter
"""

from .allocation.base import RankEvent
from .config import AdaLoRAConfig, ALoRAConfig, ConfigError, ElaLoRAConfig, FixedRankConfig
from .layers import ElasticAdapter, GatedLoRAAdapter, SVDAdapter
from .model import AdaptiveModel, TargetModuleError, get_model, handle_of
from .persistence import (AdapterLoadError, export_peft, load_adapter, load_checkpoint, merge_and_unload,
                          save_adapter, save_checkpoint)

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig", "ALoRAConfig", "ElaLoRAConfig", "FixedRankConfig", "ConfigError",
    "ElasticAdapter", "SVDAdapter", "GatedLoRAAdapter",
    "AdaptiveModel", "get_model", "handle_of", "TargetModuleError", "RankEvent",
    "save_adapter", "load_adapter", "export_peft", "merge_and_unload", "AdapterLoadError",
    "save_checkpoint", "load_checkpoint",
]
