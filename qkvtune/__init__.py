"""qkvtune: attention-centric fine-tuning. Every method is a structured update ΔW on a named slice
(q, k, v, o) of an attention projection — low-rank (LoRA, DoRA) or dense — with per-matrix learning rates."""

from .attach import (active_adapters, add_adapter, adapter_names, delete_adapter, iter_deltas, merge_adapter,
                     set_adapter, unmerge_adapter, unwrap)
from .io import export_merged, load_adapter, save_adapter
from .config import TrainConfig
from .optim import param_groups
from .targets import Rows, Target, find_targets

__version__ = "0.1.0"

__all__ = ["find_targets", "Target", "Rows", "add_adapter", "set_adapter", "active_adapters", "adapter_names",
           "delete_adapter", "iter_deltas", "merge_adapter", "unmerge_adapter", "unwrap", "save_adapter",
           "load_adapter", "export_merged", "TrainConfig", "param_groups"]
