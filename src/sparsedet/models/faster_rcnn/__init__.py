"""Faster R-CNN (FPN) with Cascade Sparse Query in the RPN (spec §5.2, paper table 9)."""
from .config import FasterRCNNConfig
from .detector import FasterRCNN
from .proposals import RPNLevelOutputs, select_proposals
from .rpn import label_rpn_anchors, rpn_losses
from .rpn_head import RPNHead, TowerView

__all__ = ["FasterRCNN", "FasterRCNNConfig", "RPNHead", "RPNLevelOutputs", "TowerView", "label_rpn_anchors",
           "rpn_losses", "select_proposals"]
