"""The masked token transformer (pure ``nn.Module``, no Lightning or distributed code) and its file format."""

from vampnet_pl.model.vampnet import TransformerBlock, VampNet, VampNetConfig, load_exported, save_exported

__all__ = ["TransformerBlock", "VampNet", "VampNetConfig", "load_exported", "save_exported"]
