"""Building blocks shared by the methods (backbones, transformers, ops)."""
