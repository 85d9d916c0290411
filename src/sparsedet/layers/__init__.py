"""Building blocks shared by every detector: box ops, box coder, RoI pooling, focal loss."""
from .box_coder import BoxCoder
from .focal_loss import fused_sigmoid_focal_loss
from .pooler import MultiLevelRoIAlign

__all__ = ["BoxCoder", "MultiLevelRoIAlign", "fused_sigmoid_focal_loss"]
