"""Import the original VampNet's checkpoints (``hugofloresgarcia/vampnet``) into this project's formats.

The original saves models with audiotools' ``BaseModel.save(package=False)``: a torch pickle
``{"state_dict": ..., "metadata": {"kwargs": <constructor arguments>, ...}}``. Both branches are read:
``ismir-2023`` (the paper, the released weights) and ``main``, whose kwargs add ``ctrl_dims``,
``cfg_dropout_prob`` and ``cond_dim`` (models with control encoders, ``ctrl_dims`` set, are refused). Its coarse and
c2f models become exported models (:func:`vampnet_pl.model.save_exported`) of the ``paper``
architecture; its codec (LAC) becomes a converted LAC file that :class:`vampnet_pl.codec.Codec`
loads (:mod:`vampnet_pl.lac_codec`).

Weights as the original computes with them: its attention and feed-forward projections are
``loralib.Linear(r=8, lora_alpha=1)`` layers, which add ``B @ A / 8`` to the weight when the
model is put in eval mode, so the import folds ``W + B A / 8`` (with the adapters of a LoRA
fine-tune, ``lora.pth``, replacing the checkpoint's own). The classifier's weight norm is folded
(``g v / |v|``) and its vocab-major rows reordered to this model's codebook-major rows.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from vampnet_pl.model.vampnet import VampNet, VampNetConfig, unwrapped_key

LORA_SCALE = 1.0 / 8  # loralib: lora_alpha / r with the original's r=8 and default lora_alpha=1
MODEL_ARGUMENTS = {"n_heads", "n_layers", "r_cond_dim", "n_codebooks", "n_conditioning_codebooks", "latent_dim",
                   "embedding_dim", "vocab_size", "flash_attn", "noise_mode", "dropout",
                   # the main branch's: control encoders (refused unless None), training-only CFG dropout, and an
                   # unused conditioning width (no weights, no effect on the forward)
                   "ctrl_dims", "cfg_dropout_prob", "cond_dim"}
ORIGINAL_DEFAULTS = {"n_heads": 20, "n_layers": 16, "r_cond_dim": 0, "n_codebooks": 9, "n_conditioning_codebooks": 0,
                     "latent_dim": 8, "embedding_dim": 1280, "vocab_size": 1024, "dropout": 0.1}
# (original name inside a layer, this model's name inside a block)
LAYER_KEYS = {"norm_1.weight": "attn_norm.weight", "norm_3.weight": "ffn_norm.weight",
              "self_attn.w_qs.weight": "attn.q.weight", "self_attn.w_ks.weight": "attn.k.weight",
              "self_attn.w_vs.weight": "attn.v.weight", "self_attn.fc.weight": "attn.out.weight",
              "feed_forward.w_1.weight": "ffn.ffn_in.weight", "feed_forward.w_2.weight": "ffn.ffn_out.weight"}


class ImportError_(ValueError):
    """A file that is not what the import expects (wrong file, keys, shapes, codec)."""


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict, dict]:
    """(constructor kwargs, state dict) of an audiotools ``BaseModel.save(package=False)`` file.

    Read with ``weights_only=True``; a file whose metadata needs arbitrary unpickling is refused
    unless ``trust_pickle`` (only for files from a source you trust: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ImportError_(f"{path} is not a torch checkpoint (not a torch.save zip archive)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any("/.data/" in f"/{name}" for name in names) and not any(name.endswith("data.pkl") for name in names):
            raise ImportError_(f"{path} is a torch.package; re-save it with BaseModel.save(path, package=False)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        from vampnet_pl.lac_codec import refusal_reason

        raise ImportError_(f"{path} holds objects a weights-only load refuses ({refusal_reason(err)}); if the file "
                           "comes from a source you trust, pass --trust-pickle") from None
    except (RuntimeError, EOFError) as err:
        raise ImportError_(f"{path} is not a torch checkpoint: {err}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "kwargs" not in payload.get("metadata", {}):
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ImportError_(f"{path} is not an audiotools BaseModel checkpoint (expected 'state_dict' and "
                           f"'metadata.kwargs', found {keys})")
    state = {unwrapped_key(k): v for k, v in payload["state_dict"].items()}  # saved from torch.compile
    return dict(payload["metadata"]["kwargs"]), state


def read_lora(path: str | Path) -> dict:
    """A LoRA fine-tune saved by the original (``loralib.lora_state_dict``): only ``lora_A``/``lora_B`` tensors."""
    path = Path(path)
    if not path.is_file():  # a run's folder given for its lora.pth: torch.load would fail with IsADirectoryError
        raise ImportError_(f"{path} is a folder: give the lora.pth in it" if path.is_dir() else f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ImportError_(f"{path} is not a LoRA state dict: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportError_(f"{path} is not a LoRA state dict (a flat dict of tensors)")
    state = {unwrapped_key(k): v for k, v in state.items()}  # the original fine-tunes a compiled model
    other = [k for k in state if "lora_" not in k]
    if other:
        raise ImportError_(f"{path} is not a LoRA state dict: keys without lora_A/lora_B such as {other[:3]}")
    return state


def paper_config(kwargs: dict, codec_fingerprint: str = "") -> VampNetConfig:
    unknown = set(kwargs) - MODEL_ARGUMENTS
    if unknown:
        raise ImportError_(f"not a VampNet checkpoint: unknown constructor arguments {sorted(unknown)}")
    args = {**ORIGINAL_DEFAULTS, **kwargs}
    if args["r_cond_dim"]:
        raise ImportError_(f"r_cond_dim={args['r_cond_dim']}: the original does not support it either")
    if args.get("ctrl_dims"):
        raise ImportError_(f"ctrl_dims={args['ctrl_dims']}: the main branch's control encoders (ctrl_encoder.*) "
                           "are not supported; only models trained without controls (ctrl_dims=None) import")
    return VampNetConfig(
        n_codebooks=args["n_codebooks"], n_conditioning_codebooks=args["n_conditioning_codebooks"],
        codebook_size=args["vocab_size"], latent_dim=args["latent_dim"], d_model=args["embedding_dim"],
        n_layers=args["n_layers"], n_heads=args["n_heads"], dropout=args["dropout"], position="relative",
        embedding="raw", ffn="paper", qkv="separate", io_bias=True, gelu_approximate="tanh", norm_eps=1e-6,
        codec_fingerprint=codec_fingerprint,
    )


def _expected_original_keys(cfg: VampNetConfig) -> dict[str, tuple]:
    d, k = cfg.d_model, cfg.n_codebooks * cfg.latent_dim
    out = cfg.n_predicted_codebooks * cfg.codebook_size
    keys = {"embedding.special.MASK": (cfg.n_codebooks, cfg.latent_dim), "embedding.out_proj.weight": (d, k, 1),
            "embedding.out_proj.bias": (d,), "transformer.norm.weight": (d,),
            "transformer.layers.0.self_attn.relative_attention_bias.weight": (cfg.relative_buckets, cfg.n_heads),
            "classifier.layers.0.bias": (out,)}
    shapes = {"norm_1.weight": (d,), "norm_3.weight": (d,), "feed_forward.w_1.weight": (4 * d, d),
              "feed_forward.w_2.weight": (d, 2 * d)}
    for i in range(cfg.n_layers):
        for name in LAYER_KEYS:
            keys[f"transformer.layers.{i}.{name}"] = shapes.get(name, (d, d))
    return keys


def _classifier_weight(state: dict, path: str) -> torch.Tensor:
    prefix = "classifier.layers.0."
    if prefix + "weight_v" in state:  # torch.nn.utils.weight_norm
        v, g = state.pop(prefix + "weight_v"), state.pop(prefix + "weight_g", None)
    elif prefix + "parametrizations.weight.original1" in state:  # torch.nn.utils.parametrizations.weight_norm
        v, g = state.pop(prefix + "parametrizations.weight.original1"), state.pop(prefix + "parametrizations.weight.original0", None)
    elif prefix + "weight" in state:  # weight norm removed before saving
        return state.pop(prefix + "weight")
    else:
        raise ImportError_(f"{path}: missing keys ['classifier.layers.0.weight_v', 'classifier.layers.0.weight_g']")
    if g is None:
        raise ImportError_(f"{path}: missing key 'classifier.layers.0.weight_g' (weight-norm gain)")
    return torch._weight_norm(v.float(), g.float(), 0)


def convert_state(kwargs: dict, state: dict, lora: dict | None = None, codebook_tables: torch.Tensor | None = None,
                  codec_fingerprint: str = "", source: str = "checkpoint") -> VampNet:
    """The original's (kwargs, state dict) [+ LoRA adapters] -> a ``paper`` :class:`VampNet` with the same forward."""
    cfg = paper_config(kwargs, codec_fingerprint)
    state = {k: v.float() for k, v in state.items()}
    adapters = {k: v for k, v in state.items() if "lora_" in k}
    if lora is not None:
        unknown = sorted(set(lora) - set(adapters))
        if unknown:
            raise ImportError_(f"LoRA keys {unknown[:3]} are not adapters of {source} (LoRA of another model?)")
        for key, value in lora.items():
            if tuple(value.shape) != tuple(adapters[key].shape):
                raise ImportError_(f"LoRA {key} has shape {tuple(value.shape)}, {source} has {tuple(adapters[key].shape)}")
        adapters.update({k: v.float() for k, v in lora.items()})
    state = {k: v for k, v in state.items() if "lora_" not in k}
    head = _classifier_weight(state, source)
    expected = _expected_original_keys(cfg)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ImportError_(f"{source} does not fit the original VampNet{tuple(sorted(kwargs.items()))}: "
                           f"missing keys {missing[:5]}, extra keys {extra[:5]}"
                           + (" (saved with flash_attn=True? not supported)" if any("Wqkv" in k for k in extra) else ""))
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ImportError_(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape} from its kwargs")
    if tuple(head.shape[:2]) != (cfg.n_predicted_codebooks * cfg.codebook_size, cfg.d_model):
        raise ImportError_(f"{source}: classifier weight has shape {tuple(head.shape)}, expected "
                           f"({cfg.n_predicted_codebooks * cfg.codebook_size}, {cfg.d_model}, 1)")

    def merged(key: str) -> torch.Tensor:
        stem = key[: -len(".weight")]
        a, b = adapters.pop(f"{stem}.lora_A", None), adapters.pop(f"{stem}.lora_B", None)
        if (a is None) != (b is None):
            raise ImportError_(f"{source}: {stem} has only one of lora_A / lora_B")
        return state[key] if a is None else state[key] + LORA_SCALE * (b @ a)

    ours = {"embedding.mask_embedding": state["embedding.special.MASK"],
            "embedding.proj.weight": state["embedding.out_proj.weight"].squeeze(-1),
            "embedding.proj.bias": state["embedding.out_proj.bias"],
            "position_bias.table.weight": state["transformer.layers.0.self_attn.relative_attention_bias.weight"],
            "norm.weight": state["transformer.norm.weight"]}
    for i in range(cfg.n_layers):
        for theirs, mine in LAYER_KEYS.items():
            ours[f"blocks.{i}.{mine}"] = merged(f"transformer.layers.{i}.{theirs}")
    if adapters:
        raise ImportError_(f"{source}: adapters of layers the model does not have: {sorted(adapters)[:3]}")
    # the original lays the classifier's channels out vocab-major (v * n_predicted + c); ours is codebook-major
    n_pred, vocab = cfg.n_predicted_codebooks, cfg.codebook_size
    ours["head.weight"] = head.squeeze(-1).view(vocab, n_pred, cfg.d_model).transpose(0, 1).reshape(n_pred * vocab, -1)
    ours["head.bias"] = state["classifier.layers.0.bias"].view(vocab, n_pred).t().reshape(-1)
    if codebook_tables is None:
        codebook_tables = torch.zeros(cfg.n_codebooks, cfg.codebook_size, cfg.latent_dim)
    if tuple(codebook_tables.shape) != (cfg.n_codebooks, cfg.codebook_size, cfg.latent_dim):
        raise ImportError_(f"the codec's codebooks {tuple(codebook_tables.shape)} do not fit {source} "
                           f"({cfg.n_codebooks} codebooks of {cfg.codebook_size} x {cfg.latent_dim})")
    ours["embedding.codebook_tables"] = codebook_tables.float()
    model = VampNet(cfg)
    model.load_state_dict({k: v.contiguous() for k, v in ours.items()})
    return model.eval()


def check_codec_fits(cfg_kwargs: dict, codec, source: str) -> None:
    args = {**ORIGINAL_DEFAULTS, **cfg_kwargs}
    problems = []
    if args["vocab_size"] != codec.codebook_size:
        problems.append(f"vocab_size {args['vocab_size']} != codec codebook_size {codec.codebook_size}")
    if args["n_codebooks"] > codec.n_codebooks:
        problems.append(f"n_codebooks {args['n_codebooks']} > codec's {codec.n_codebooks}")
    if args["latent_dim"] != int(codec.model.codebook_dim):
        problems.append(f"latent_dim {args['latent_dim']} != codec codebook_dim {codec.model.codebook_dim}")
    if problems:
        raise ImportError_(f"the codec {codec.source} does not match {source}: " + "; ".join(problems))


def check_role(cfg: VampNetConfig, name: str, source: str) -> None:
    """A coarse model reads no conditioning codebooks, a c2f model does: refuse the one given in the other's place
    (it would be written as the other's file, and generation would fail on it later)."""
    is_c2f = cfg.n_conditioning_codebooks > 0
    if name == "coarse" and is_c2f:
        raise ImportError_(f"{source} is a c2f model (n_conditioning_codebooks={cfg.n_conditioning_codebooks}), "
                           "not a coarse one: give it as --c2f")
    if name == "c2f" and not is_c2f:
        raise ImportError_(f"{source} is a coarse model (n_conditioning_codebooks=0), not a c2f one: give it as --coarse")


def convert_codec(path: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """The original's LAC ``codec.pth`` (weights or a torch.package) -> a converted LAC file that ``Codec.load`` reads."""
    from vampnet_pl.lac_codec import is_lac_package, is_original_lac, lac_from_state, read_lac_package, save_lac

    if Path(out).resolve() == Path(path).resolve():
        raise ImportError_(f"{path}: the converted codec would be written over this original; choose another "
                           "output folder (--out-dir)")
    if is_lac_package(path):
        if not trust_pickle:
            raise ImportError_(f"{path} is a torch.package of LAC: loading it runs the code packed in it; if the file "
                               "comes from a source you trust, pass --trust-pickle")
        try:
            kwargs, state = read_lac_package(path)
        except ValueError as err:
            raise ImportError_(str(err)) from None
    else:
        kwargs, state = read_checkpoint(path, trust_pickle)
    if not is_original_lac(state):
        raise ImportError_(f"{path} is not a LAC codec checkpoint (a DAC checkpoint? Codec.load reads those as they are)")
    try:
        model = lac_from_state(kwargs, state, str(path))
    except ValueError as err:
        raise ImportError_(str(err)) from None
    return save_lac(out, model)


def import_vampnet(out_dir: str | Path, codec: str | Path, coarse: str | Path | None = None, c2f: str | Path | None = None,
                   coarse_lora: str | Path | None = None, c2f_lora: str | Path | None = None,
                   trust_pickle: bool = False) -> dict[str, Path]:
    """Convert the codec (LAC ``codec.pth``; a DAC checkpoint or an already converted file is used as is) and
    the models into ``out_dir``: ``codec.pth``, ``coarse.pt``, ``c2f.pt``. Returns the written paths."""
    from vampnet_pl.codec import Codec, peek_checkpoint
    from vampnet_pl.model.vampnet import save_exported

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    from vampnet_pl.lac_codec import FORMAT, is_lac_package, is_original_lac

    codec_path = Path(codec)
    if not codec_path.is_file():
        raise ImportError_(f"{codec_path}: no such codec file")
    if is_lac_package(codec_path):
        written["codec"] = codec_path = convert_codec(codec_path, out_dir / "codec.pth", trust_pickle)
    try:
        peek = peek_checkpoint(codec_path)  # None: a torch.package DAC, which Codec.load reads
    except pickle.UnpicklingError:  # metadata that needs unpickling: refused unless trust_pickle
        peek = {"state_dict": read_checkpoint(codec_path, trust_pickle)[1]}
    if isinstance(peek, dict) and peek.get("format") != FORMAT and is_original_lac(peek.get("state_dict")):
        written["codec"] = convert_codec(codec_path, out_dir / "codec.pth", trust_pickle)
        codec_path = written["codec"]
    loaded = Codec.load(str(codec_path), device="cpu")  # a converted LAC or a DAC checkpoint
    for name, path, lora in (("coarse", coarse, coarse_lora), ("c2f", c2f, c2f_lora)):
        if path is None:
            if lora is not None:
                raise ImportError_(f"--{name}-lora needs --{name}")
            continue
        kwargs, state = read_checkpoint(path, trust_pickle)
        check_codec_fits(kwargs, loaded, str(path))
        cfg = paper_config(kwargs)
        check_role(cfg, name, str(path))
        tables = loaded.codebook_tables("raw")[: cfg.n_codebooks]
        model = convert_state(kwargs, state, read_lora(lora) if lora else None, tables, loaded.fingerprint, str(path))
        written[name] = out_dir / f"{name}.pt"
        save_exported(written[name], model)
    return written
