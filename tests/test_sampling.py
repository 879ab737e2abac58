"""The iterative parallel sampler: prompts untouched, every mask filled, per-example schedules, filters."""

from __future__ import annotations

import torch

from vampnet_pl.generation.sampling import SamplingConfig, filter_logits, sample


class Recorder:
    """A stand-in model: fixed logits favouring token (frame % V); records the masks it saw."""

    def __init__(self, predicted: int, vocab: int = 16):
        self.predicted, self.vocab, self.masks = predicted, vocab, []

    def __call__(self, codes, mask):
        self.masks.append(mask.clone())
        batch, _, frames = codes.shape
        logits = torch.zeros(batch, self.predicted, frames, self.vocab)
        logits[..., torch.arange(frames), torch.arange(frames) % self.vocab] = 5.0
        return logits


def test_prompt_tokens_are_kept_and_every_masked_token_is_filled():
    codes = torch.full((2, 3, 20), 7)
    mask = torch.zeros(2, 3, 20, dtype=torch.bool)
    mask[0, 1:, 5:15] = True  # example 0: 20 masked tokens
    mask[1, 1:, :] = True  # example 1: 40 masked tokens
    codes[mask] = 99  # placeholders must all be replaced
    model = Recorder(predicted=2)
    out = sample(model, codes, mask, SamplingConfig(passes=8, seed=0), n_conditioning=1)
    assert torch.equal(out[~mask], codes[~mask])
    assert not (out == 99).any() and int(out.max()) < 16
    counts = torch.stack([m[:, 1:].flatten(1).sum(1) for m in model.masks])  # [passes, batch]
    assert counts[0].tolist() == [20, 40]
    assert (counts[1:] <= counts[:-1]).all()  # masks only shrink
    assert counts[1, 0] < 20 and counts[1, 1] < 40 and counts[1, 1] > counts[1, 0]  # per-example schedule
    assert len(model.masks) <= 8


def test_conditioning_codebooks_are_never_generated():
    codes = torch.randint(0, 16, (1, 4, 12))
    mask = torch.ones(1, 4, 12, dtype=torch.bool)
    out = sample(Recorder(predicted=2), codes, mask, SamplingConfig(passes=4, seed=1), n_conditioning=2)
    assert torch.equal(out[:, :2], codes[:, :2])


def test_seed_makes_it_deterministic_and_argmax_follows_the_model():
    codes = torch.zeros(1, 2, 16, dtype=torch.long)
    mask = torch.ones(1, 2, 16, dtype=torch.bool)
    a = sample(Recorder(2), codes, mask, SamplingConfig(passes=6, seed=3))
    b = sample(Recorder(2), codes, mask, SamplingConfig(passes=6, seed=3))
    assert torch.equal(a, b)
    greedy = sample(Recorder(2), codes, mask, SamplingConfig(passes=6, argmax_from=0.0, seed=3))
    assert torch.equal(greedy[0, 0], torch.arange(16) % 16)


def test_filters_really_filter():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    typical = filter_logits(logits, typical_p=0.3)
    kept = (~torch.isinf(typical)).sum().item()
    assert 1 <= kept < 4


def test_sampling_with_the_real_model_on_a_periodic_prompt():
    from vampnet_pl.masking.prompts import periodic
    from vampnet_pl.model import VampNet, VampNetConfig

    cfg = VampNetConfig(n_codebooks=6, n_conditioning_codebooks=2, codebook_size=32, latent_dim=8, d_model=32,
                        n_layers=2, n_heads=4, dropout=0.0)
    model = VampNet(cfg, torch.randn(6, 32, 8)).eval()
    codes = torch.randint(0, 32, (3, 6, 24))
    mask = periodic(codes.shape, period=4)
    out = sample(model, codes, mask, SamplingConfig(passes=12, top_k=8, seed=0), n_conditioning=2)
    assert out.shape == codes.shape and torch.equal(out[:, :2], codes[:, :2])
    assert torch.equal(out[~mask], codes[~mask])
