"""Training loop, distributed helpers, evaluation loop and the full-batch overfit loop."""
from .trainer import Trainer

__all__ = ["Trainer"]
