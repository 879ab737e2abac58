"""Tokens of one decoding run of the original VampNet ``generate``, for tests/test_sampling.py.

    PYTHONPATH=/work/orig/vampnet-ismir:/work/orig/lac:/work/orig/deps .venv/bin/python \
        scripts/make_sampler_fixture.py --original /work/orig/vampnet-ismir --out tests/fixtures/sampler_original.pt

Builds a tiny original ``VampNet``, replaces its network by the deterministic toy model of
``tests/sampler_toy.py`` (so only the decoding algorithms are compared), and runs the original's
``generate`` with argmax tokens (``sample_cutoff`` below 0) and no re-masking noise
(``mask_temperature=0``), where our sampler is meant to pick the same tokens. The fixture holds
the toy tables' seed, the inputs, the settings and the original's output tokens; no code of the
original is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sampler_toy import toy_logits, toy_tables  # noqa: E402

CASES = [  # name, codebooks, conditioning, frames, passes, temperature, top_p
    ("plain", 3, 0, 24, 8, 1.0, None),
    ("conditioned_tempered_nucleus", 4, 2, 20, 6, 0.7, 0.8),
]
VOCAB = 32


def run_original(original: Path, n_codebooks: int, n_conditioning: int, frames: int, passes: int,
                 temperature: float, top_p: float | None, seed: int) -> dict:
    sys.path.insert(0, str(original))
    from vampnet.modules.transformer import VampNet as OriginalVampNet

    model = OriginalVampNet(n_heads=1, n_layers=1, n_codebooks=n_codebooks, n_conditioning_codebooks=n_conditioning,
                            latent_dim=2, embedding_dim=8, vocab_size=VOCAB, flash_attn=False).eval()
    n_predicted = n_codebooks - n_conditioning
    tables = toy_tables(n_codebooks, n_predicted, VOCAB, frames, seed)
    assert model.mask_token == VOCAB
    model.embedding.from_codes = lambda z, codec: z  # the toy network reads the tokens themselves
    # the original's layout: [B, V, (T P)]
    model.forward = lambda z: toy_logits(tables, z).permute(0, 3, 2, 1).reshape(z.shape[0], VOCAB, -1)
    generator = torch.Generator().manual_seed(seed + 1)
    codes = torch.randint(0, VOCAB, (1, n_codebooks, frames), generator=generator)
    mask = torch.rand(1, n_codebooks, frames, generator=generator) < 0.7
    mask[:, :n_conditioning] = False
    out = model.generate(codec=None, time_steps=frames, sampling_steps=passes, start_tokens=codes,
                         sampling_temperature=temperature, mask=mask.int(), mask_temperature=0.0, top_p=top_p,
                         return_signal=False, sample_cutoff=-1.0)
    return {"n_codebooks": n_codebooks, "n_conditioning": n_conditioning, "frames": frames, "passes": passes,
            "temperature": temperature, "top_p": top_p, "table_seed": seed, "codes": codes, "mask": mask,
            "original_tokens": out.long()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True, help="checkout of hugofloresgarcia/vampnet")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/sampler_original.pt"))
    args = parser.parse_args()
    cases = {name: run_original(args.original, *spec, seed=i) for i, (name, *spec) in enumerate(CASES)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"vocab": VOCAB, "cases": cases}, args.out)
    print(f"wrote {args.out}: {', '.join(cases)}")


if __name__ == "__main__":
    main()
