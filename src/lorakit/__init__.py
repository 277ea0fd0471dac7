"""lorakit: LoRA-family fine-tuning on PyTorch with PEFT-format adapters."""

from lorakit.adapters.combine import combine
from lorakit.adapters.inject import (
    active_adapters,
    inject,
    match_targets,
    set_active,
    set_parent,
    trainable_report,
)
from lorakit.adapters.io import AdapterFileError, load_adapter, read_adapter, save_adapter
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.loraplus import loraplus_param_groups
from lorakit.adapters.merge import merge, merge_and_unload, merge_weights, unmerge
from lorakit.config import LoraSpec, TrainConfig
from lorakit.models import load
from lorakit.multi.routing import route
from lorakit.multi.store import AdapterStore

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterStore",
    "LoraLayer",
    "LoraSpec",
    "TrainConfig",
    "active_adapters",
    "combine",
    "inject",
    "load",
    "load_adapter",
    "loraplus_param_groups",
    "match_targets",
    "merge",
    "merge_and_unload",
    "merge_weights",
    "read_adapter",
    "route",
    "save_adapter",
    "set_active",
    "set_parent",
    "trainable_report",
    "unmerge",
]
