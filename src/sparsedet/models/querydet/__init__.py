"""QueryDet: RetinaNet on P2..P7 with a query head for Cascade Sparse Query inference."""
from .config import CSQConfig, QueryDetConfig, QueryHeadConfig
from .detector import QueryDet
from .query_targets import query_targets

__all__ = ["CSQConfig", "QueryDet", "QueryDetConfig", "QueryHeadConfig", "query_targets"]
