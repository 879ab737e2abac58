"""Turn any training checkpoint into one portable model file.

Reads a Lightning checkpoint file (DDP, single device), a sharded checkpoint folder (FSDP,
FSDP2/ModelParallel: torch distributed checkpoint) or a DeepSpeed checkpoint folder, and writes
weights + model config + codec fingerprint, loadable with ``torch.load(weights_only=True)``
through :func:`vampnet_pl.model.load_exported`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vampnet_pl.model import VampNet, VampNetConfig, save_exported
from vampnet_pl.model.vampnet import unwrapped_key
from vampnet_pl.training.module import merge_lora_state


def read_checkpoint(path: str | Path) -> dict:
    """A full (consolidated) Lightning checkpoint dict from a file or a sharded folder; ``ValueError`` for anything
    else (another file, a folder that is no checkpoint)."""
    path = Path(path)
    if path.is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own training checkpoint
        except OSError:
            raise
        except Exception as err:  # torch.load of another format fails in many ways (unpickling, KeyError, IndexError ...)
            raise ValueError(f"{path} is not a training checkpoint: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path} is not a training checkpoint (it holds a {type(checkpoint).__name__})")
        return checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():  # DeepSpeed
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            checkpoint = torch.load(out, map_location="cpu", weights_only=False)
        checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in checkpoint["state_dict"].items()}
        return checkpoint
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is a folder but not a checkpoint (no sharded .metadata, no DeepSpeed 'latest'); "
                         "give checkpoints/last.ckpt or another checkpoint in it")
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(path)  # FSDP sharded / ModelParallel (DCP format)
    if "state_dict" not in checkpoint and "model" in checkpoint:
        checkpoint["state_dict"] = checkpoint.pop("model")
    return checkpoint


def model_from_checkpoint(path: str | Path) -> VampNet:
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is no vampnet-pl training checkpoint (no model config in its hyper_parameters, "
                         "or no state_dict)")
    state = {unwrapped_key(k.removeprefix("model.")): v for k, v in checkpoint["state_dict"].items()
             if k.startswith("model.")}
    if hparams.get("lora"):
        state = merge_lora_state(state, hparams["lora"])
    model = VampNet(VampNetConfig(**hparams["model"]))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    if Path(out).is_dir():
        raise ValueError(f"{out} is a folder: give the model file to write, e.g. {Path(out) / 'coarse.pt'}")
    save_exported(out, model_from_checkpoint(checkpoint))
    return Path(out)
