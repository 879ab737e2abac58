"""The VampNet transformer: a bidirectional masked token model over DAC codes.

One class serves both stages. The **coarse** model reads and predicts the first codebooks;
the **coarse-to-fine (c2f)** model reads all codebooks and predicts the fine ones, with the
first ``n_conditioning_codebooks`` always visible. No Lightning and no distributed code here.

Input: each frame's codes are looked up in the codec's own (frozen) codebook tables, a learned
MASK vector replaces masked tokens, the codebooks of a frame are concatenated and projected
to the model width: one token per frame. Blocks: pre-norm RMSNorm, attention with a T5
relative position bias shared by all layers (or rotary embeddings), GEGLU feed-forward.
Output: logits over the codebook for every predicted codebook.

The switches below select between the original VampNet network (``conf/model/*_paper.yaml``:
``embedding=raw, ffn=paper, qkv=separate, io_bias=true, gelu_approximate=tanh, norm_eps=1e-6``;
numerically the original's forward pass, see ``vampnet_pl.model.import_vampnet``) and this
project's variants (projected tables, wider feed-forward, fused qkv, rotary positions).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vampnet_pl.model.attention import BACKENDS, RelativeBias, attend, relative_bucket, resolve_backend
from vampnet_pl.model.dropout import Dropout
from vampnet_pl.model.linear import CPU_MATMUL, Linear, linear
from vampnet_pl.model.norm import RMSNorm
from vampnet_pl.utils.checks import check_at_least


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
    position: str = "relative"  # "relative" (T5 bias, one table shared by all layers) or "rotary"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # "raw": the codec's codebook vectors (codebook_dim wide, 8 for DAC/LAC), as the original VampNet;
    # "projected": the codebooks after each quantizer's out_proj (the codec's latent width)
    embedding: str = "projected"
    # "paper": GEGLU with hidden ffn_mult*d/2 (w_1: d->4d, w_2: 2d->d), the original's;
    # "wide": hidden ffn_mult*d*2/3 (same parameters as a plain ffn_mult MLP)
    ffn: str = "wide"
    qkv: str = "fused"  # "fused" (one d->3d projection) or "separate" (q, k, v projections, the original's)
    io_bias: bool = False  # biases on the input projection and the output head (the original has them)
    gelu_approximate: str = "none"  # "none" (exact GELU) or "tanh" (the original's GELU)
    norm_eps: Optional[float] = None  # RMSNorm epsilon (None: the dtype's eps; the original uses 1e-6)
    attention_backend: str = "auto"  # auto (flex on CUDA for the relative bias, no dropout) | flex | sdpa: attention.py
    cpu_matmul: str = "auto"  # auto (oneDNN on x86 CPUs) | onednn | aten: the CPU fp32 linear kernel, model/linear.py
    codec_fingerprint: str = ""

    def __post_init__(self) -> None:
        check_at_least(self, "", d_model=1, n_layers=1, n_heads=1, codebook_size=1, latent_dim=1)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.n_conditioning_codebooks < self.n_codebooks:
            raise ValueError("need 0 <= n_conditioning_codebooks < n_codebooks")
        choices = {"position": ("relative", "rotary"), "embedding": ("raw", "projected"), "ffn": ("paper", "wide"),
                   "qkv": ("fused", "separate"), "gelu_approximate": ("none", "tanh")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.position == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"position=rotary rotates pairs of dimensions: the head width d_model / n_heads = "
                             f"{self.d_model // self.n_heads} must be even")
        if self.position == "relative":
            check_relative_buckets(self.relative_buckets, self.relative_max_distance)
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.cpu_matmul not in CPU_MATMUL:
            raise ValueError(f"cpu_matmul must be one of {CPU_MATMUL}, got {self.cpu_matmul!r}")

    @property
    def ffn_hidden(self) -> int:
        if self.ffn == "paper":
            return int(self.ffn_mult * self.d_model) // 2
        return int(self.ffn_mult * self.d_model * 2 / 3)

    @property
    def n_predicted_codebooks(self) -> int:
        return self.n_codebooks - self.n_conditioning_codebooks

    def to_dict(self) -> dict:
        return asdict(self)


# Fields that only choose kernels: a resumed run may change them.
KERNEL_FIELDS = ("attention_backend", "cpu_matmul")
# Fields that leave the function a trained model computes as it is: the kernels and dropout (training only). Every
# other field is part of what the weights mean (init_from checks them).
RUNTIME_FIELDS = ("dropout", *KERNEL_FIELDS)


def check_relative_buckets(n_buckets: int, max_distance: int) -> None:
    """Raise ``ValueError`` unless the T5 buckets are well formed: at least one exact bucket per direction, and
    ``max_distance`` beyond the exact ones (else the log-spaced buckets divide by zero or run backwards, into
    negative indices that wrap around the table)."""
    exact = n_buckets // 4
    if exact < 1:
        raise ValueError(f"relative_buckets must be at least 4 (a quarter exact per direction), got {n_buckets}")
    if max_distance <= exact:
        raise ValueError(f"relative_max_distance={max_distance} must exceed relative_buckets // 4 = {exact} "
                         "(the distances with a bucket each)")


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias, bidirectional, one table shared by every layer."""

    def __init__(self, n_heads: int, n_buckets: int, max_distance: int):
        super().__init__()
        self.n_buckets, self.max_distance = n_buckets, max_distance
        self.table = nn.Embedding(n_buckets, n_heads)
        self.reused: dict | None = None  # see VampNet.position_bias_reused

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        return relative_bucket(relative, self.n_buckets, self.max_distance)

    def forward(self, frames: int, materialise: bool = True) -> RelativeBias:
        """The bias for ``frames``; ``materialise``: also build the ``[1, heads, T, T]`` mask (sdpa path)."""
        if self.reused is None:
            return RelativeBias.from_table(self.table.weight, frames, self.n_buckets, self.max_distance, materialise)
        key = (frames, materialise)
        if key not in self.reused:
            self.reused[key] = RelativeBias.from_table(self.table.weight.detach(), frames, self.n_buckets,
                                                       self.max_distance, materialise)
        return self.reused[key]


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
        if cfg.qkv == "fused":
            self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=False, cpu_matmul=cfg.cpu_matmul)
        else:
            self.q = Linear(cfg.d_model, cfg.d_model, bias=False, cpu_matmul=cfg.cpu_matmul)
            self.k = Linear(cfg.d_model, cfg.d_model, bias=False, cpu_matmul=cfg.cpu_matmul)
            self.v = Linear(cfg.d_model, cfg.d_model, bias=False, cpu_matmul=cfg.cpu_matmul)
        self.out = Linear(cfg.d_model, cfg.d_model, bias=False, cpu_matmul=cfg.cpu_matmul)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, heads, T, head_dim]``."""
        batch, frames, width = x.shape
        shape = (batch, frames, self.n_heads, width // self.n_heads)
        if hasattr(self, "qkv"):
            return self.qkv(x).view(batch, frames, 3, *shape[2:]).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(proj(x).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor, bias: RelativeBias | None, rotary: tuple | None) -> torch.Tensor:
        batch, frames, width = x.shape
        q, k, v = self.project(x)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = attend(q, k, v, position_bias=bias, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out(y.transpose(1, 2).reshape(batch, frames, width))


class GEGLU(nn.Module):
    """``ffn_in`` gives (value, gate) halves; value * GELU(gate), dropout, ``ffn_out``."""

    def __init__(self, cfg: VampNetConfig):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.approximate = cfg.gelu_approximate
        self.ffn_in = Linear(cfg.d_model, 2 * hidden, bias=False, cpu_matmul=cfg.cpu_matmul)
        self.ffn_out = Linear(hidden, cfg.d_model, bias=False, cpu_matmul=cfg.cpu_matmul)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.ffn_in(x).chunk(2, dim=-1)
        return self.ffn_out(self.dropout(value * F.gelu(gate, approximate=self.approximate)))


class TransformerBlock(nn.Module):
    """Pre-norm attention + GEGLU; the unit that FSDP wraps and activation checkpointing recomputes."""

    def __init__(self, cfg: VampNetConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = GEGLU(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: RelativeBias | None = None, rotary: tuple | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), bias, rotary))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def check_token_range(codes: torch.Tensor, codebook_size: int) -> None:
    """Raise ``ValueError`` unless every token is in ``[0, codebook_size)``.

    Damaged tokens must never reach an embedding (a wrong vector, or a device-side assert on GPU) or a
    loss. One ``aminmax`` pass over the (small, integer) codes: on the order of microseconds per batch,
    and one host sync on GPU (see BENCHMARKS.md, Data integrity).
    """
    if codes.numel() == 0:
        return
    if codes.dtype in (torch.uint16, torch.uint32, torch.uint64):  # the shards' uint16 included: aminmax has no kernel
        codes = codes.long()  # (a uint64 beyond int64 wraps negative: refused all the same)
    low, high = (int(v) for v in torch.aminmax(codes))
    if low < 0 or high >= codebook_size:
        raise ValueError(f"token {low if low < 0 else high} is outside [0, {codebook_size}): damaged or foreign codes "
                         "(the data readers validate samples; see `vampnet-pl prep verify --deep`)")


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
        self.proj = Linear(cfg.n_codebooks * cfg.latent_dim, cfg.d_model, bias=cfg.io_bias, cpu_matmul=cfg.cpu_matmul)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, codebooks, frames = codes.shape
        offsets = torch.arange(codebooks, device=codes.device)[None, :, None] * self.codebook_tables.shape[1]
        flat_tables = self.codebook_tables.flatten(0, 1)
        latent = F.embedding(codes.long() + offsets, flat_tables)  # VampNet.features checked the range; [B,K,T,D]
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
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # rows: codebook-major (row c * codebook_size + v); the original's classifier is vocab-major
        self.head = Linear(cfg.d_model, cfg.n_predicted_codebooks * cfg.codebook_size, bias=cfg.io_bias,
                           cpu_matmul=cfg.cpu_matmul)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor, check_range: bool = True,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """``codes`` integer (any dtype) ``[B, n_codebooks, T]``, ``mask`` bool of the same shape (True = masked)
        -> logits ``[B, n_predicted, T, codebook_size]``.

        ``select`` (bool ``[B, n_predicted, T]``): return only the logits of these tokens, ``[N, codebook_size]``
        in :func:`packed` order; the head then runs on them alone (training: the masked tokens, the only ones
        with a loss). ``check_range=False`` skips the token-range check (a host sync on GPU) for callers that
        checked the codes already: the LightningModule checks each batch on the CPU before it moves to the
        device, the sampler once per signal.
        """
        features = self.features(codes, mask, check_range)
        if select is not None:
            return self.classify_selected(features, select)
        return self.classify(features).permute(0, 2, 1, 3)  # [B, T, n_predicted, V] -> [B, n_predicted, T, V]

    def features(self, codes: torch.Tensor, mask: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """The final normalised hidden states ``[B, T, d_model]``: all of the model but its output head."""
        _, codebooks, frames = codes.shape
        if codebooks != self.cfg.n_codebooks:
            raise ValueError(f"model reads {self.cfg.n_codebooks} codebooks, got {codebooks}")
        if mask.shape != codes.shape:  # a mask of fewer codebooks or frames would broadcast over the others
            raise ValueError(f"mask {tuple(mask.shape)} must have the codes' shape {tuple(codes.shape)} "
                             "(every codebook's, conditioning included)")
        if check_range:
            check_token_range(codes, self.cfg.codebook_size)
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
        return self.norm(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The output head: features ``[..., d_model]`` -> logits ``[..., n_predicted, codebook_size]``. The
        sampler runs it on the frames it still has to fill, a cache-sized block of them at a time."""
        return self.head(features).unflatten(-1, (self.cfg.n_predicted_codebooks, self.cfg.codebook_size))

    def classify_selected(self, features: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """The head on the selected tokens only: features ``[B, T, d_model]``, ``select`` bool
        ``[B, n_predicted, T]`` -> logits ``[N, codebook_size]`` in :func:`packed` order. Each codebook's rows
        of the head weight multiply the features of the frames where that codebook is selected."""
        n_predicted, vocab = self.cfg.n_predicted_codebooks, self.cfg.codebook_size
        expected = (features.shape[0], n_predicted, features.shape[1])
        if select.shape != expected:  # a selection of all codebooks would be split by the wrong codebook
            raise ValueError(f"select {tuple(select.shape)} must be [batch, predicted codebooks, frames] = {expected}")
        if type(self.head) is not Linear or self.head.weight.shape != (n_predicted * vocab, self.cfg.d_model):
            # an adapted head (LoRA on "head"), or a weight that exists whole only inside the head's own forward
            # (DeepSpeed ZeRO-3 gathers it there): the head's forward on every token, then the selection
            return packed(self.classify(features).transpose(1, 2), select)
        weight = self.head.weight.unflatten(0, (n_predicted, vocab))
        bias = self.head.bias.unflatten(0, (n_predicted, vocab)) if self.head.bias is not None else None
        # the number of selected tokens decides the shapes: on GPU a host sync, as any boolean selection
        where = select.transpose(0, 1).nonzero()  # [N, 3]: (codebook, example, frame), packed order
        per_codebook = torch.bincount(where[:, 0], minlength=n_predicted).tolist()
        # a frame masked in several codebooks is gathered once for each: F.embedding's backward sums those
        # gradients in a fixed order, on the CPU (index_add) and on CUDA. Advanced indexing's backward adds them
        # atomically across CPU threads, and index_select's across CUDA threads: sums that vary run to run.
        rows = F.embedding(where[:, 1] * features.shape[1] + where[:, 2], features.flatten(0, 1)).split(per_codebook)
        return torch.cat([linear(rows[k], weight[k], None if bias is None else bias[k], self.head.onednn)
                          for k in range(n_predicted)])

    @contextlib.contextmanager
    def position_bias_reused(self):
        """Within this block the relative position bias is built once per length and reused by every
        forward pass: for the sampler's passes over one window, whose weights do not change (at batch 1
        the dense bias costs as much as the rest of a tiny model's attention)."""
        if self.position_bias is None:
            yield
            return
        self.position_bias.reused = {}
        try:
            yield
        finally:
            self.position_bias.reused = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, frames: int) -> float:
        """Training FLOPs per token, as in the PaLM appendix: 6N + attention when every weight trains. A frozen
        weight (LoRA) costs 4 of the 6 (forward and the input's gradient, no weight gradient)."""
        counted = [p for name, p in self.named_parameters() if "mask_embedding" not in name]
        return (4 * sum(p.numel() for p in counted) + 2 * sum(p.numel() for p in counted if p.requires_grad)
                + 12 * self.cfg.n_layers * self.cfg.d_model * frames)


def packed(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """The entries of ``values`` (``[B, n_predicted, T, ...]``) where ``select`` (bool ``[B, n_predicted, T]``)
    is True, codebook-major (codebook, then example, then frame): the order of ``VampNet(..., select=)``."""
    return values.transpose(0, 1)[select.transpose(0, 1)]


WRAPPER_KEYS = ("_orig_mod.", "_checkpoint_wrapped_module.")  # what compile and activation checkpointing add


def unwrapped_key(key: str) -> str:
    """A state-dict key as the plain model names it, whatever wraps the model or its blocks (``torch.compile``,
    activation checkpointing: ``training.parallel.parallelize``)."""
    for part in WRAPPER_KEYS:
        key = key.replace(part, "")
    return key


def save_exported(path, model: VampNet) -> None:
    """One portable file: weights + model config + codec fingerprint (loadable with weights_only=True). The model may
    be compiled or have wrapped blocks: the file holds the plain model's keys."""
    from vampnet_pl.utils.atomic import atomic_path

    state = {unwrapped_key(k): v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"config": model.cfg.to_dict(), "state_dict": state,
               "codec_fingerprint": model.cfg.codec_fingerprint, "format": "vampnet-pl/1"}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_exported(path, data: bytes | None = None) -> VampNet:
    """The model in a file :func:`save_exported` wrote, on the CPU and in eval mode (as inference wants it: dropout
    off); ``ValueError`` for any other file. ``data``: the file's bytes, when the caller read them already (to hash
    them too): loaded instead of reading ``path`` again."""
    not_ours = (f"{path} is not an exported vampnet-pl model (make one with `vampnet-pl export` from a training "
                "checkpoint, or `vampnet-pl import-vampnet` from the original VampNet's)")
    try:
        payload = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch.load of another format fails in many ways (unpickling, KeyError, IndexError ...)
        raise ValueError(f"{not_ours}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if isinstance(payload, dict) and isinstance(payload.get("metadata"), dict) and "kwargs" in payload["metadata"]:
        raise ValueError(f"{path} is an original VampNet checkpoint (audiotools), not an exported vampnet-pl model: "
                         "convert it with `vampnet-pl import-vampnet` and give the .pt it writes")
    if not isinstance(payload, dict) or payload.get("format") != "vampnet-pl/1":
        raise ValueError(not_ours)
    unknown = sorted(set(payload["config"]) - {f.name for f in fields(VampNetConfig)})
    if unknown:
        raise ValueError(f"{path} has model settings this vampnet-pl does not know ({', '.join(unknown)}): exported by "
                         "a newer version? Update vampnet-pl to load it")
    model = VampNet(VampNetConfig(**payload["config"]))
    model.load_state_dict({unwrapped_key(k): v for k, v in payload["state_dict"].items()})  # older files: wrapped keys
    return model.eval()
