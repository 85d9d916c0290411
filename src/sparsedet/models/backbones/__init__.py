"""Backbones (ResNet, MobileNetV2) and the FPN neck, assembled by ``build_backbone``."""
from .build import BackboneConfig, FPNConfig, BackboneWithFPN, build_backbone

__all__ = ["BackboneConfig", "FPNConfig", "BackboneWithFPN", "build_backbone"]
