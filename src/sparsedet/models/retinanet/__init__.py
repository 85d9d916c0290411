"""RetinaNet (Lin et al., ICCV 2017) as configured in the QueryDet repository (``RetinaNet_D2``)."""
from .config import RetinaNetConfig
from .detector import RetinaNet

__all__ = ["RetinaNet", "RetinaNetConfig"]
