"""Detectors and the registry that builds them from a config's ``model.name``."""
from .build import MODELS, build_model

__all__ = ["MODELS", "build_model"]
