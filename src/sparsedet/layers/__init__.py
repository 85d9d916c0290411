"""Building blocks shared by every detector: box ops, box coder, RoI pooling."""
from .box_coder import BoxCoder
from .pooler import MultiLevelRoIAlign

__all__ = ["BoxCoder", "MultiLevelRoIAlign"]
