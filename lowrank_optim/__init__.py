"""lowrank_optim: memory-efficient low-rank optimizers for PyTorch, all presets of one engine.

from lowrank_optim import GaLoreAdamW, lowrank_param_groups
opt = GaLoreAdamW(lowrank_param_groups(model, ["attn", "mlp"], rank=128), lr=1e-3)
"""

from .apollo import APOLLOAdamW, APOLLOMiniAdamW
from .convert import convert_state_dict, detect_source, foreign_state_message
from .dct import DCTAdamW
from .fira import FiraAdamW
from .frugal import FrugalAdamW
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .groups import lowrank_param_groups
from .layerwise import LayerwiseOptimizer
from .memory import estimate_state_bytes
from .optimizer import LowRankOptimizer
from .projectors import PROJECTORS, make_projector
from .registry import METHODS, method
from .sst import SSTAdamW

__version__ = "0.1.0"

__all__ = [
    "LowRankOptimizer",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdafactor",
    "FiraAdamW",
    "FrugalAdamW",
    "DCTAdamW",
    "SSTAdamW",
    "APOLLOAdamW",
    "APOLLOMiniAdamW",
    "METHODS",
    "method",
    "convert_state_dict",
    "detect_source",
    "foreign_state_message",
    "LayerwiseOptimizer",
    "lowrank_param_groups",
    "estimate_state_bytes",
    "PROJECTORS",
    "make_projector",
    "__version__",
]
