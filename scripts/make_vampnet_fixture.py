"""Make the VampNet parity fixture by running the ORIGINAL implementation (not part of the package).

    PYTHONPATH=/path/lac:/path/deps python scripts/make_vampnet_fixture.py --vampnet /path/vampnet-ismir \\
        --vampnet-main /path/vampnet-main --lac /path/lac --out tests/fixtures/vampnet_original

Builds small, seeded, randomly initialised original models (coarse, c2f, a LoRA fine-tune of
the coarse one) and a small LAC codec, saves them in the original's formats, and records what
the original computes with them (fp32, CPU): codec codes and decoded audio, logits for a fixed
mask, and the tokens of one ``VampNet.generate`` call with a fixed seed. The LoRA file is saved as
the original's fine-tuning saves it, from a torch.compile'd model (keys prefixed ``_orig_mod.``);
its logits are those of the adapters loaded into the model, as intended (the original's Interface
loads such a file with ``strict=False`` and so ignores every key). The loralib adapters get
random (non-zero) values so that the import's adapter merge is exercised. Everything written
is data; none of the original's code is copied into this project.

With ``--vampnet-main`` (a checkout of the ``main`` branch, run in a subprocess: both are the
package ``vampnet``), the coarse model is also loaded by the main branch's code and saved as its
training loop saves a checkpoint: right after validation, in eval mode, so loralib has merged the
adapters into the weights (they are saved as well), with the main branch's constructor arguments
(``ctrl_dims``, ``cfg_dropout_prob``, ``cond_dim``). ``coarse_main.pth`` and ``main_io.pt`` (the logits
of that file loaded as the main branch's Interface loads it) are added to an existing ``--out``
when ``--vampnet`` is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

CODEC = dict(encoder_dim=4, encoder_rates=[2, 4, 4, 2], decoder_dim=16, decoder_rates=[2, 4, 4, 2], n_codebooks=6,
             codebook_size=64, codebook_dim=8, sample_rate=16000)
MODEL = dict(n_heads=2, embedding_dim=32, vocab_size=64, latent_dim=8, flash_attn=False, dropout=0.1)
COARSE = dict(MODEL, n_layers=2, n_codebooks=4, n_conditioning_codebooks=0)
C2F = dict(MODEL, n_layers=2, n_codebooks=6, n_conditioning_codebooks=4)  # conditioned on the coarse codebooks
FRAMES = 150  # > 128, the relative position bias's max distance
GENERATE = dict(sampling_steps=4, mask_temperature=10.5, sampling_temperature=1.0, typical_filtering=False,
                top_p=None, seed=1234, sample_cutoff=1.0)


def randomise_adapters(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def git_commit(path: str) -> str:
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def resave_with_main_branch(vampnet_main: str, lac: str, out: Path) -> None:
    """coarse.pth -> coarse_main.pth, saved as the main branch's training loop saves; main_io.pt: its logits."""
    sys.path[:0] = [vampnet_main, lac]
    from lac.model.lac import LAC
    from vampnet.modules.transformer import VampNet

    record = torch.load(out / "io.pt", weights_only=True)
    model = VampNet.load(str(out / "coarse.pth"), strict=True)
    model.eval()  # validate() runs before checkpoint(): loralib merges B A / 8 into the saved weights
    model.save(str(out / "coarse_main.pth"), package=False)
    codec = LAC.load(str(out / "codec.pth")).eval()
    loaded = VampNet.load(str(out / "coarse_main.pth"), strict=False).eval()  # as the main branch's Interface
    z = record["codes"][:, : loaded.n_codebooks]
    with torch.no_grad():
        logits = loaded(loaded.embedding.from_codes(z.masked_fill(record["coarse_mask"], loaded.mask_token), codec))
    torch.save({"coarse_main_mask": record["coarse_mask"], "coarse_main_logits": logits}, out / "main_io.pt")
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["vampnet_main_commit"] = git_commit(vampnet_main)
    info_path.write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vampnet", help="checkout of hugofloresgarcia/vampnet (ismir-2023); left out: only "
                        "--vampnet-main's files are added to --out")
    parser.add_argument("--vampnet-main", help="checkout of hugofloresgarcia/vampnet (main)")
    parser.add_argument("--lac", required=True, help="checkout of hugofloresgarcia/lac")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.vampnet is None:
        if args.vampnet_main is None:
            parser.error("give --vampnet, --vampnet-main or both")
        resave_with_main_branch(args.vampnet_main, args.lac, Path(args.out))
        return
    sys.path[:0] = [args.vampnet, args.lac]
    import loralib
    from lac.model.lac import LAC
    from vampnet.modules.transformer import VampNet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    codec = LAC(**CODEC).eval()
    codec.save(str(out / "codec.pth"), package=False)
    seconds = FRAMES * codec.hop_length / CODEC["sample_rate"]
    t = torch.arange(int(seconds * CODEC["sample_rate"])) / CODEC["sample_rate"]
    audio = (0.4 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t))
             + 0.05 * torch.randn(t.shape, generator=generator))[None, None]
    with torch.no_grad():
        encoded = codec.encode(audio, CODEC["sample_rate"])
        codes = encoded["codes"]
        decoded = codec.decode(codec.quantizer.from_codes(codes)[0])["audio"]
    record = {"audio": audio, "sample_rate": CODEC["sample_rate"], "codes": codes, "decoded": decoded,
              "codec_z": encoded["z"]}

    models = {}
    for name, kwargs in (("coarse", COARSE), ("c2f", C2F)):
        model = VampNet(**kwargs)
        randomise_adapters(model, generator)
        model.train()  # saved unmerged (the training loop saves merged ones: see coarse_main.pth)
        model.save(str(out / f"{name}.pth"), package=False)
        models[name] = model

    lora_model = VampNet(**COARSE)  # a LoRA fine-tune of the coarse model: same base, other adapters
    lora_model.load_state_dict(models["coarse"].state_dict())
    randomise_adapters(lora_model, generator)
    # saved as the original's fine-tuning saves lora.pth: from its torch.compile'd model, keys prefixed _orig_mod.
    torch.save(loralib.lora_state_dict(torch.compile(lora_model)), out / "coarse_lora.pth")

    for name, model in (("coarse", models["coarse"]), ("c2f", models["c2f"]), ("coarse_lora", lora_model)):
        model.eval()  # loralib merges its adapters here, as the original's Interface does after loading
        z = codes[:, : model.n_codebooks]
        mask = torch.rand(z.shape, generator=generator) < 0.6
        mask[:, : model.n_conditioning_codebooks] = False
        with torch.no_grad():
            latents = model.embedding.from_codes(z.masked_fill(mask, model.mask_token), codec)
            logits = model(latents)  # [B, vocab, T * n_predicted] (time-major, codebook-minor)
        record[f"{name}_mask"] = mask
        record[f"{name}_logits"] = logits

    for name in ("coarse", "c2f"):
        model = models[name]
        z = codes[:, : model.n_codebooks]
        mask = torch.zeros_like(z, dtype=torch.int)
        mask[..., FRAMES // 3 : 2 * FRAMES // 3] = 1  # inpaint the middle third
        mask[:, : model.n_conditioning_codebooks] = 0
        with torch.no_grad():
            tokens = model.generate(codec, start_tokens=z, mask=mask, return_signal=False, **GENERATE)
        record[f"{name}_generate_mask"] = mask.bool()
        record[f"{name}_generate_tokens"] = tokens

    torch.save(record, out / "io.pt")
    info = {"vampnet_commit": git_commit(args.vampnet), "lac_commit": git_commit(args.lac), "torch": torch.__version__,
            "codec": CODEC, "coarse": COARSE, "c2f": C2F, "frames": FRAMES, "generate": GENERATE,
            "lora": "loralib r=8, lora_alpha=1 (scale 1/8); adapters random N(0, 0.5^2)"}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.vampnet_main is not None:  # another process: its package is also called vampnet
        subprocess.run([sys.executable, __file__, "--vampnet-main", args.vampnet_main, "--lac", args.lac,
                        "--out", str(out)], check=True)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
