"""vampnet-pl: distributed Lightning training for VampNet-style masked acoustic token models."""

__version__ = "0.1.0"
