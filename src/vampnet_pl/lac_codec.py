"""LAC, the codec of the released VampNet models (``hugofloresgarcia/lac``), as a module the codec wrapper loads.

``dac.DAC`` cannot hold a LAC checkpoint: LAC's encoder ends at its last block's width (no
``d_latent`` convolution), its residual units do not crop, its strided convolutions pad by
``stride // 2`` and its decoder blocks are HiFi-GAN style multi-receptive-field blocks
(kernels 3, 7, 11, dilations 1, 3, 5, averaged). The quantizer is DAC's residual VQ. Module
names follow LAC's so that its state dict loads as is; the interface (``encode``,
``decode``, ``quantizer``, the facts) is the one :class:`vampnet_pl.codec.Codec` uses for DAC.

A converted LAC is one file ``{"format": FORMAT, "kwargs": ..., "state_dict": ...}``, loadable
with ``weights_only=True`` (``vampnet-pl import-vampnet`` writes it from LAC's ``codec.pth``). The
original may also be a torch.package (audiotools' ``BaseModel.save`` default, which LAC's training
writes as ``package.pth`` and ``LAC.load`` reads first): :func:`read_lac_package`.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "vampnet-pl/lac/1"
PACKAGE_RESOURCE = "LAC/LAC.pth"  # audiotools' BaseModel.save(package=True): <class name>/<class name>.pth
ARGUMENTS = ("encoder_dim", "encoder_rates", "decoder_dim", "decoder_rates", "n_codebooks", "codebook_size",
             "codebook_dim", "sample_rate")


def _layers():
    from dac.nn.layers import Snake1d, WNConv1d, WNConvTranspose1d

    return Snake1d, WNConv1d, WNConvTranspose1d


class _Residual(nn.Module):
    """x + f(x), with ``f`` stored under the attribute name LAC uses."""

    def __init__(self, attribute: str, body: nn.Sequential):
        super().__init__()
        self._attribute = attribute
        setattr(self, attribute, body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + getattr(self, self._attribute)(x)


def _snake_conv_pair(channels: int, kernel: int, dilation: int, second_kernel: int) -> nn.Sequential:
    Snake1d, WNConv1d, _ = _layers()
    return nn.Sequential(
        Snake1d(channels),
        WNConv1d(channels, channels, kernel_size=kernel, dilation=dilation, padding=(kernel - 1) * dilation // 2),
        Snake1d(channels),
        WNConv1d(channels, channels, kernel_size=second_kernel, padding=(second_kernel - 1) // 2),
    )


class _Sequential(nn.Module):
    def __init__(self, attribute: str, layers):
        super().__init__()
        self._attribute = attribute
        setattr(self, attribute, nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._attribute)(x)


class _MultiReceptiveField(nn.Module):
    """Mean of residual stacks with different kernel sizes."""

    def __init__(self, channels: int, kernels=(3, 7, 11), dilations=(1, 3, 5)):
        super().__init__()
        self.mrf_blocks = nn.ModuleList(
            _Sequential("block", [_Residual("layer", _snake_conv_pair(channels, k, d, k)) for d in dilations])
            for k in kernels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(stack(x) for stack in self.mrf_blocks) / len(self.mrf_blocks)


def _encoder(width: int, rates) -> tuple[nn.Module, int]:
    Snake1d, WNConv1d, _ = _layers()
    layers = [WNConv1d(1, width, kernel_size=7, padding=3)]
    for stride in rates:
        width *= 2
        half = width // 2
        units = [_Residual("block", _snake_conv_pair(half, 7, d, 1)) for d in (1, 3, 9)]
        down = WNConv1d(half, width, kernel_size=2 * stride, stride=stride, padding=stride // 2)
        layers.append(_Sequential("block", [*units, Snake1d(half), down]))
    layers += [Snake1d(width), WNConv1d(width, width, kernel_size=3, padding=1)]
    return _Sequential("block", layers), width


def _decoder(latent: int, width: int, rates) -> nn.Module:
    Snake1d, WNConv1d, WNConvTranspose1d = _layers()
    layers = [WNConv1d(latent, width, kernel_size=7, padding=3)]
    for i, stride in enumerate(rates):
        c_in, c_out = width // 2**i, width // 2 ** (i + 1)
        up = WNConvTranspose1d(c_in, c_out, kernel_size=2 * stride, stride=stride, padding=stride // 2)
        layers.append(_Sequential("block", [Snake1d(c_in), up, _MultiReceptiveField(c_out)]))
    c_out = width // 2 ** len(rates)
    layers += [Snake1d(c_out), WNConv1d(c_out, 1, kernel_size=7, padding=3), nn.Tanh()]
    return _Sequential("model", layers)


class LAC(nn.Module):
    def __init__(self, encoder_dim: int = 64, encoder_rates=(2, 4, 8, 8), decoder_dim: int = 512,
                 decoder_rates=(4, 4, 4, 2, 2, 2), n_codebooks: int = 9, codebook_size: int = 1024,
                 codebook_dim: int = 8, sample_rate: int = 44100):
        super().__init__()
        from dac.nn.quantize import ResidualVectorQuantize

        if any(r % 2 for r in (*encoder_rates, *decoder_rates)):
            raise ValueError(f"LAC needs even strides, got encoder {encoder_rates}, decoder {decoder_rates}")
        self.encoder_dim, self.encoder_rates = encoder_dim, list(encoder_rates)
        self.decoder_dim, self.decoder_rates = decoder_dim, list(decoder_rates)
        self.n_codebooks, self.codebook_size, self.codebook_dim = n_codebooks, codebook_size, codebook_dim
        self.sample_rate = sample_rate
        self.hop_length = math.prod(decoder_rates)
        self.encoder, self.latent_dim = _encoder(encoder_dim, encoder_rates)
        self.quantizer = ResidualVectorQuantize(self.latent_dim, n_codebooks, codebook_size, codebook_dim, 0.0)
        self.decoder = _decoder(self.latent_dim, decoder_dim, decoder_rates)

    def kwargs(self) -> dict:
        return {name: getattr(self, name) for name in ARGUMENTS}

    def encode(self, audio: torch.Tensor, n_quantizers: int | None = None):
        """``[B, 1, samples]`` (whole frames) -> (z, codes, latents, commitment loss, codebook loss), as ``dac.DAC``."""
        return self.quantizer(self.encoder(audio), n_quantizers)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def lac_from_state(kwargs: dict, state_dict: dict, source: str = "LAC checkpoint") -> LAC:
    unknown = set(kwargs) - set(ARGUMENTS) - {"quantizer_dropout"}
    if unknown:
        raise ValueError(f"{source}: unknown LAC arguments {sorted(unknown)}")
    model = LAC(**{k: v for k, v in kwargs.items() if k in ARGUMENTS})
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(f"{source} does not fit LAC{tuple(kwargs.items())}: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, extra keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, LAC expects {tuple(expected[key].shape)}")
    model.load_state_dict(state_dict)
    return model.eval()


def save_lac(path: str | Path, model: LAC) -> Path:
    from vampnet_pl.utils.atomic import atomic_path

    payload = {"format": FORMAT, "kwargs": model.kwargs(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def is_original_lac(state_dict) -> bool:
    """An original LAC state dict (its decoder has multi-receptive-field blocks, DAC's does not)."""
    return isinstance(state_dict, dict) and any(".mrf_blocks." in str(key) for key in state_dict)


def is_lac_package(path: str | Path) -> bool:
    """A torch.package holding a LAC (its archive's files sit under one top folder named after the archive)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == PACKAGE_RESOURCE for name in archive.namelist())


def read_lac_package(path: str | Path) -> tuple[dict, dict]:
    """(kwargs, state dict) of a LAC torch.package. Loading it runs the code packed in it: only for trusted files."""
    from torch.package import PackageImporter

    try:
        model = PackageImporter(str(path)).load_pickle(*PACKAGE_RESOURCE.split("/"), map_location="cpu")
        kwargs = {name: getattr(model, name) for name in ARGUMENTS}
    except (ImportError, AttributeError, RuntimeError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: the LAC in this torch.package cannot be loaded here: {err}") from None
    kwargs = {k: [int(x) for x in v] if isinstance(v, (list, tuple)) else int(v) for k, v in kwargs.items()}  # plain ints
    return kwargs, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def refusal_reason(err: pickle.UnpicklingError) -> str:
    """The line of a weights-only load's refusal that names what it refused."""
    lines = str(err).splitlines() or [type(err).__name__]
    return next((line for line in lines if "Unsupported" in line), lines[0]).strip()


def lac_from_payload(payload, path: str | Path) -> LAC | None:
    """The LAC in a codec file's weights-only ``payload`` (:func:`vampnet_pl.codec.peek_checkpoint`) if it is a
    converted LAC file, else None (a DAC checkpoint). VampNet's LAC in its original format is refused with a pointer
    to the import."""
    if payload is None and is_lac_package(path):
        raise ValueError(f"{path} is a torch.package of VampNet's LAC codec: convert it first with `vampnet-pl "
                         "import-vampnet --codec PATH --out-dir DIR --trust-pickle` (only for a file from a source you "
                         "trust: loading a package runs the code packed in it)")
    if not isinstance(payload, dict):
        return None
    if payload.get("format") != FORMAT:
        if is_original_lac(payload.get("state_dict")):
            raise ValueError(f"{path} is VampNet's LAC codec in its original format: convert it first with "
                             "`vampnet-pl import-vampnet --codec PATH --out-dir DIR`")
        return None
    return lac_from_state(payload["kwargs"], payload["state_dict"], str(path))
