"""The VampNet transformer: a bidirectional masked token model over DAC codes.

One class serves both stages. The **coarse** model reads and predicts the first codebooks;
the **coarse-to-fine (c2f)** model reads all codebooks and predicts the fine ones, with the
first ``n_conditioning_codebooks`` always visible. No Lightning and no distributed code here.

Input: each frame's codes are looked up in the codec's own (frozen) codebook tables, a learned
MASK vector replaces masked tokens, the codebooks of a frame are concatenated and projected
to the model width: one token per frame. Blocks: pre-norm RMSNorm, SDPA attention with a T5
relative position bias shared by all layers (or rotary embeddings), GEGLU feed-forward, no
biases. Output: logits over the codebook for every predicted codebook.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vampnet_pl.model.attention import BACKENDS, RelativeBias, attend, relative_bucket, resolve_backend


@dataclass
class VampNetConfig:
    n_codebooks: int = 4  # codebooks the model reads
    n_conditioning_codebooks: int = 0  # of those, the first ones are always-visible conditioning
    codebook_size: int = 1024
    latent_dim: int = 8  # width of the codec's codebook tables
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: float = 4.0
    dropout: float = 0.1
    position: str = "relative"  # "relative" (T5 bias) or "rotary"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    attention_backend: str = "auto"  # auto (flex on CUDA for the relative bias) | flex | sdpa: model/attention.py
    codec_fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.n_conditioning_codebooks < self.n_codebooks:
            raise ValueError("need 0 <= n_conditioning_codebooks < n_codebooks")
        if self.position not in ("relative", "rotary"):
            raise ValueError(f"position must be 'relative' or 'rotary', got {self.position!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")

    @property
    def n_predicted_codebooks(self) -> int:
        return self.n_codebooks - self.n_conditioning_codebooks

    def to_dict(self) -> dict:
        return asdict(self)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias, bidirectional, one table shared by every layer."""

    def __init__(self, n_heads: int, n_buckets: int, max_distance: int):
        super().__init__()
        self.n_buckets, self.max_distance = n_buckets, max_distance
        self.table = nn.Embedding(n_buckets, n_heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        return relative_bucket(relative, self.n_buckets, self.max_distance)

    def forward(self, frames: int, materialise: bool = True) -> RelativeBias:
        """The bias for ``frames``; ``materialise``: also build the ``[1, heads, T, T]`` mask (sdpa path)."""
        return RelativeBias.from_table(self.table.weight, frames, self.n_buckets, self.max_distance, materialise)


def rotary_tables(frames: int, head_dim: int, device, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(frames, device=device).float(), inv_freq)
    return angles.cos()[None, None], angles.sin()[None, None]  # [1, 1, T, head_dim/2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: VampNetConfig):
        super().__init__()
        self.n_heads, self.dropout, self.backend = cfg.n_heads, cfg.dropout, cfg.attention_backend
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: RelativeBias | None, rotary: tuple | None) -> torch.Tensor:
        batch, frames, width = x.shape
        q, k, v = self.qkv(x).view(batch, frames, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = attend(q, k, v, position_bias=bias, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out(y.transpose(1, 2).reshape(batch, frames, width))


class GEGLU(nn.Module):
    def __init__(self, cfg: VampNetConfig):
        super().__init__()
        hidden = int(cfg.ffn_mult * cfg.d_model * 2 / 3)
        self.ffn_in = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.ffn_out = nn.Linear(hidden, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.ffn_in(x).chunk(2, dim=-1)
        return self.ffn_out(self.dropout(value * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm attention + GEGLU; the unit that FSDP wraps and activation checkpointing recomputes."""

    def __init__(self, cfg: VampNetConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.ffn = GEGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: RelativeBias | None = None, rotary: tuple | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), bias, rotary))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class CodeEmbedding(nn.Module):
    """Codec codebook lookups (frozen buffers) + a learned MASK vector per codebook, projected to d_model."""

    def __init__(self, cfg: VampNetConfig, codebook_tables: torch.Tensor | None = None):
        super().__init__()
        shape = (cfg.n_codebooks, cfg.codebook_size, cfg.latent_dim)
        if codebook_tables is None:
            codebook_tables = torch.zeros(shape)  # filled by load_state_dict
        if tuple(codebook_tables.shape) != shape:
            raise ValueError(f"codebook tables {tuple(codebook_tables.shape)} do not fit the config {shape}")
        self.register_buffer("codebook_tables", codebook_tables.float().clone())
        self.mask_embedding = nn.Parameter(torch.randn(cfg.n_codebooks, cfg.latent_dim) * 0.02)
        self.proj = nn.Linear(cfg.n_codebooks * cfg.latent_dim, cfg.d_model, bias=False)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, codebooks, frames = codes.shape
        offsets = torch.arange(codebooks, device=codes.device)[None, :, None] * self.codebook_tables.shape[1]
        flat_tables = self.codebook_tables.flatten(0, 1)
        latent = F.embedding(codes.clamp(0, self.codebook_tables.shape[1] - 1) + offsets, flat_tables)  # [B,K,T,D]
        latent = torch.where(mask[..., None], self.mask_embedding[None, :, None, :].to(latent.dtype), latent)
        return self.proj(latent.permute(0, 2, 1, 3).reshape(batch, frames, -1).to(self.proj.weight.dtype))


class VampNet(nn.Module):
    def __init__(self, cfg: VampNetConfig, codebook_tables: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.embedding = CodeEmbedding(cfg, codebook_tables)
        self.position_bias = (
            RelativePositionBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance)
            if cfg.position == "relative"
            else None
        )
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_predicted_codebooks * cfg.codebook_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``codes`` long ``[B, n_codebooks, T]``, ``mask`` bool (True = masked) -> logits ``[B, n_predicted, T, codebook_size]``."""
        batch, codebooks, frames = codes.shape
        if codebooks != self.cfg.n_codebooks:
            raise ValueError(f"model reads {self.cfg.n_codebooks} codebooks, got {codebooks}")
        x = self.embedding(codes, mask)
        bias = None
        if self.position_bias is not None:  # once per forward, shared by every layer
            dropout = self.cfg.dropout if self.training else 0.0
            backend = resolve_backend(self.cfg.attention_backend, x.device, True, dropout)
            bias = self.position_bias(frames, materialise=backend == "sdpa")
        head_dim = self.cfg.d_model // self.cfg.n_heads
        rotary = rotary_tables(frames, head_dim, x.device) if self.cfg.position == "rotary" else None
        for block in self.blocks:
            x = block(x, bias, rotary)
        logits = self.head(self.norm(x))  # [B, T, n_predicted * V]
        return logits.view(batch, frames, self.cfg.n_predicted_codebooks, self.cfg.codebook_size).permute(0, 2, 1, 3)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, frames: int) -> float:
        """Training FLOPs per token (forward + backward, 6N + attention), as in the PaLM appendix."""
        n = sum(p.numel() for name, p in self.named_parameters() if "mask_embedding" not in name)
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * frames


def save_exported(path, model: VampNet) -> None:
    """One portable file: weights + model config + codec fingerprint (loadable with weights_only=True)."""
    from vampnet_pl.utils.atomic import atomic_path

    payload = {"config": model.cfg.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "codec_fingerprint": model.cfg.codec_fingerprint, "format": "vampnet-pl/1"}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_exported(path, map_location="cpu") -> VampNet:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != "vampnet-pl/1":
        raise ValueError(f"{path} is not an exported vampnet-pl model")
    model = VampNet(VampNetConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model
