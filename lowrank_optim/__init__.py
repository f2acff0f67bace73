"""lowrank_optim: memory-efficient low-rank optimizers for PyTorch on one engine."""
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .optimizer import LowRankOptimizer
from .projectors import PROJECTORS, make_projector

__version__ = "0.1.0"

__all__ = ["LowRankOptimizer", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "PROJECTORS", "make_projector",
           "__version__"]
