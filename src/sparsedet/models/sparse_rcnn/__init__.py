from .config import SparseRCNNConfig, SparseRCNNLossConfig
from .detector import SparseRCNN

__all__ = ["SparseRCNN", "SparseRCNNConfig", "SparseRCNNLossConfig"]
