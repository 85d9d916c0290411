"""TSP-FCOS and TSP-RCNN (Sun et al., "Rethinking Transformer-based Set Prediction for Object
Detection", ICCV 2021): encoder-only transformers over FCOS features of interest / RPN RoIs,
trained with a restricted set-prediction loss. Spec: tsp.md."""
from .fcos_config import TSPFCOSConfig
from .fcos_detector import TSPFCOS
from .rcnn_config import TSPRCNNConfig
from .rcnn_detector import TSPRCNN
from .restricted_matching import restricted_match

__all__ = ["TSPFCOS", "TSPFCOSConfig", "TSPRCNN", "TSPRCNNConfig", "restricted_match"]
