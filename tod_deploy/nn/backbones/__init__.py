"""Backbones returning multi-level feature maps."""
