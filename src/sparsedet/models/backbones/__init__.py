"""Backbones (ResNet, MobileNetV2) and their necks (FPN, deformable encoder), assembled by
``build_backbone`` / ``build_deformable_backbone``."""
from .build import BackboneConfig, FPNConfig, BackboneWithFPN, build_backbone
from .deformable_encoder import (BackboneWithDeformableEncoder, DeformableEncoderConfig,
                                 build_deformable_backbone)

__all__ = ["BackboneConfig", "FPNConfig", "BackboneWithFPN", "build_backbone", "DeformableEncoderConfig",
           "BackboneWithDeformableEncoder", "build_deformable_backbone"]
