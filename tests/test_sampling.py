"""The iterative parallel sampler: prompts untouched, every mask filled, per-example schedules, filters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import on_two_ranks

from sampler_toy import ToyModel, toy_tables
from vampnet_pl.generation.sampling import SamplingConfig, filter_logits, sample, sample_rows


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
    greedy = sample(Recorder(2), codes, mask, SamplingConfig(passes=6, sample_cutoff=-1.0, seed=3))
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


FIXTURE = Path(__file__).parent / "fixtures" / "sampler_original.pt"


@pytest.mark.parametrize("case", ["plain", "conditioned_tempered_nucleus"])
def test_same_tokens_as_the_original_generate_where_the_algorithms_agree(case):
    """Argmax tokens, no re-masking noise, batch 1: the original's ``generate`` (fixture made by
    scripts/make_sampler_fixture.py) and ours decode the toy model to the same tokens."""
    data = torch.load(FIXTURE, weights_only=True)
    spec = data["cases"][case]
    predicted = spec["n_codebooks"] - spec["n_conditioning"]
    model = ToyModel(toy_tables(spec["n_codebooks"], predicted, data["vocab"], spec["frames"], spec["table_seed"]))
    cfg = SamplingConfig(passes=spec["passes"], temperature=spec["temperature"], top_p=spec["top_p"],
                         mask_temperature=0.0, sample_cutoff=-1.0)
    ours = sample(model, spec["codes"], spec["mask"], cfg, spec["n_conditioning"])
    assert torch.equal(ours, spec["original_tokens"])
    if spec["top_p"] is not None:  # re-masking by the raw distribution's confidence decodes differently
        raw = _sample_with_raw_confidence(model, spec, cfg)
        assert not torch.equal(raw, spec["original_tokens"])


def _sample_with_raw_confidence(model, spec, cfg):
    """Our sampler, but ranking re-masking by the model's unfiltered, untempered log-probabilities."""
    import vampnet_pl.generation.sampling as sampling

    original = sampling.sample_rows

    def raw_rows(logits, cfg, uniform=None):
        token, _ = original(logits, cfg, uniform)
        return token, logits.float().log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)

    sampling.sample_rows = raw_rows
    try:
        return sample(model, spec["codes"], spec["mask"], cfg, spec["n_conditioning"])
    finally:
        sampling.sample_rows = original


def test_confidence_is_from_the_distribution_sampled_from():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    token, confidence = sample_rows(logits, SamplingConfig(temperature=0.5, top_k=2))
    expected = (logits[0, :2] / 0.5).log_softmax(-1)[0]
    assert token.item() == 0 and confidence.item() == pytest.approx(expected.item(), abs=1e-6)
    assert confidence.item() != pytest.approx(logits.log_softmax(-1)[0, 0].item(), abs=1e-3)


def test_drawn_tokens_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(40000, 1)
    uniform = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(0))
    token, confidence = sample_rows(logits, SamplingConfig(top_k=3), uniform)
    frequencies = torch.bincount(token, minlength=4).float() / token.numel()
    assert frequencies[3] == 0
    assert torch.allclose(frequencies[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.01)
    assert torch.allclose(confidence.exp(), (torch.tensor([0.5, 0.3, 0.15]) / 0.95)[token], atol=1e-5)


def test_typical_filter_keeps_its_minimum_token_count():
    logits = torch.log(torch.tensor([[0.9, 0.04, 0.03, 0.02, 0.01]]))
    assert (~torch.isinf(filter_logits(logits, typical_p=0.1))).sum() == 1
    kept = ~torch.isinf(filter_logits(logits, typical_p=0.1, typical_min_tokens=3))
    assert kept.sum() == 3 and kept[0, 0]


def test_sample_cutoff_switches_to_argmax():
    codes = torch.zeros(1, 1, 16, dtype=torch.long)
    mask = torch.ones(1, 1, 16, dtype=torch.bool)
    flat = lambda c, m: torch.zeros(c.shape[0], 1, c.shape[-1], 16)  # noqa: E731 (uniform: argmax is token 0)
    drawn = sample(flat, codes, mask, SamplingConfig(passes=4, seed=0))
    greedy = sample(flat, codes, mask, SamplingConfig(passes=4, seed=0, sample_cutoff=-1.0))
    assert drawn.unique().numel() > 1 and greedy.eq(0).all()


def test_schedule_is_counted_per_example_and_every_pass_commits_a_token():
    codes = torch.zeros(3, 1, 30, dtype=torch.long)
    mask = torch.zeros(3, 1, 30, dtype=torch.bool)
    mask[0, 0, :3] = True  # 3 masked over 6 passes: the floor would commit nothing early on
    mask[1, 0, :] = True
    model = Recorder(predicted=1)
    sample(model, codes, mask, SamplingConfig(passes=6, seed=0))
    counts = torch.stack([m.flatten(1).sum(1) for m in model.masks])  # [passes, batch]
    assert counts[:, 2].eq(0).all()  # a fully prompted example stays untouched
    assert counts[:3, 0].tolist() == [3, 2, 1] and counts[3:, 0].eq(1).all()  # >= 1 committed, >= 1 kept
    expected = [30] + [int(torch.cos(torch.tensor(s / 6 * torch.pi / 2)) * 30) for s in range(1, 6)]
    assert counts[:, 1].tolist() == expected


def test_cuda_graphs_option_runs_eagerly_off_cuda():
    codes = torch.randint(0, 16, (2, 2, 12))
    mask = torch.ones(2, 2, 12, dtype=torch.bool)
    a = sample(Recorder(2), codes, mask, SamplingConfig(passes=4, seed=0, cuda_graphs=True))
    b = sample(Recorder(2), codes, mask, SamplingConfig(passes=4, seed=0))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_eager_tokens_on_cuda():
    from vampnet_pl.model import VampNet, VampNetConfig

    cfg = VampNetConfig(n_codebooks=4, codebook_size=32, latent_dim=8, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    model = VampNet(cfg, torch.randn(4, 32, 8)).eval().cuda()
    codes = torch.randint(0, 32, (2, 4, 40), device="cuda")
    mask = torch.ones_like(codes, dtype=torch.bool)
    eager = sample(model, codes, mask, SamplingConfig(passes=6, seed=0, sample_cutoff=-1.0, mask_temperature=0.0))
    graphed = sample(model, codes, mask, SamplingConfig(passes=6, seed=0, sample_cutoff=-1.0, mask_temperature=0.0,
                                                        cuda_graphs=True))
    assert torch.equal(eager, graphed)


def test_a_vampnet_is_range_checked_once_per_signal_not_per_pass(monkeypatch):
    from vampnet_pl.model import VampNet, VampNetConfig
    from vampnet_pl.model import vampnet as vampnet_module

    model = VampNet(VampNetConfig(n_codebooks=2, codebook_size=16, latent_dim=4, d_model=16, n_layers=1, n_heads=2)).eval()
    checks = []
    original = vampnet_module.check_token_range
    monkeypatch.setattr(vampnet_module, "check_token_range", lambda *a: checks.append(1) or original(*a))
    codes, mask = torch.randint(0, 16, (1, 2, 12)), torch.ones(1, 2, 12, dtype=torch.bool)
    sample(model, codes, mask, SamplingConfig(passes=4, seed=0))
    assert len(checks) == 0  # the per-forward check is off: the sampler checked the signal itself
    damaged = codes.clone()
    damaged[0, 1, 3] = 16
    with pytest.raises(ValueError, match="outside"):
        sample(model, damaged, mask, SamplingConfig(passes=4, seed=0))


@pytest.mark.parametrize("rows_per_block", [512, 3])
def test_the_head_on_masked_frames_only_gives_the_same_tokens_as_the_full_head(rows_per_block, monkeypatch):
    import vampnet_pl.generation.sampling as sampling
    from vampnet_pl.model import VampNet, VampNetConfig

    monkeypatch.setattr(sampling, "ROWS_PER_BLOCK", rows_per_block)  # 3: a block of one frame, uneven row counts

    torch.manual_seed(0)
    model = VampNet(VampNetConfig(n_codebooks=3, n_conditioning_codebooks=1, codebook_size=16, latent_dim=4,
                                  d_model=16, n_layers=1, n_heads=2)).eval()
    codes = torch.randint(0, 16, (3, 3, 20))
    mask = torch.rand(3, 3, 20) < 0.6
    frames = mask[:, 1:].any(1)
    packed = model.classify(model.features(codes, mask)[frames])
    full = model(codes, mask)
    assert torch.allclose(packed, full.permute(0, 2, 1, 3)[frames], atol=1e-6)
    cfg = SamplingConfig(passes=5, seed=3, temperature=1.0, top_p=0.9)
    full_head = sample(lambda c, m: model(c, m), codes, mask, cfg, n_conditioning=1)  # a plain callable: full head
    assert torch.equal(sample(model, codes, mask, cfg, n_conditioning=1), full_head)


def test_nan_logits_never_change_the_prompt():
    """A NaN confidence sorted above the prompt's +inf score, so prompt tokens were re-masked and overwritten."""
    codes = torch.randint(0, 16, (2, 2, 30))
    mask = torch.rand(2, 2, 30) < 0.5

    def broken(codes, mask):
        logits = torch.zeros(codes.shape[0], 2, codes.shape[-1], 16)
        logits[:, :, ::3] = float("nan")
        return logits

    out = sample(broken, codes, mask, SamplingConfig(passes=6, seed=0))
    assert torch.equal(out[~mask], codes[~mask])


@pytest.mark.parametrize("option", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(typical_p=0.0),
                                    dict(passes=0), dict(typical_min_tokens=0), dict(mask_temperature=-1.0)])
def test_sampling_options_out_of_range_fail_clearly(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"sampling {name} must be"):
        SamplingConfig(**option)


def _sharded_sampling_rank(rank: int, port: int, results: dict) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vampnet_pl.model import VampNet, VampNetConfig
    from vampnet_pl.training.parallel import parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = VampNet(VampNetConfig(n_codebooks=4, codebook_size=32, latent_dim=8, d_model=32, n_layers=2, n_heads=4,
                                      dropout=0.0)).eval()
        codes = torch.randint(0, 32, (2, 4, 24))
        mask = torch.rand(2, 4, 24) < 0.5 if rank == 0 else torch.zeros(2, 4, 24, dtype=torch.bool)  # rank 1: nothing
        cfg = SamplingConfig(passes=4, seed=1)
        reference = sample(model, codes, mask, cfg)
        parallelize(model, init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel")))
        results[rank] = torch.equal(sample(model, codes, mask, cfg), reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_a_model_sharded_by_fsdp2_samples_as_the_plain_one():
    """Its parameters are whole only inside its forward, and every rank must make the same calls (here rank 1
    has nothing to generate): the sampler runs its forward once a pass, as the training-time evaluation does."""
    assert on_two_ranks(_sharded_sampling_rank) == {0: True, 1: True}


class Spread:
    """The same spread-out distribution at every position of every example: only the random streams tell
    tokens apart, and no example's logits depend on another's."""

    def __call__(self, codes, mask):
        return torch.linspace(0, 2, 32).expand(codes.shape[0], codes.shape[1], codes.shape[-1], 32).clone()


def test_each_example_draws_from_its_own_stream_whatever_shares_its_batch():
    from vampnet_pl.generation.sampling import example_generators

    codes = torch.zeros(3, 2, 24, dtype=torch.long)
    mask = torch.ones(3, 2, 24, dtype=torch.bool)
    mask[1, :, :10] = False  # the examples differ in what they generate
    mask[2, 1] = False
    cfg = SamplingConfig(passes=5, seed=11)
    together = sample(Spread(), codes, mask, cfg, generators=example_generators(11, [4, 7, 9], "cpu"))
    for row, example_id in enumerate([4, 7, 9]):
        alone = sample(Spread(), codes[row : row + 1], mask[row : row + 1], cfg,
                       generators=example_generators(11, [example_id], "cpu"))
        assert torch.equal(together[row], alone[0])
    by_default = sample(Spread(), codes[:2], torch.ones(2, 2, 24, dtype=torch.bool), cfg)  # ids 0 and 1
    assert not torch.equal(by_default[0], by_default[1])
    with pytest.raises(ValueError, match="2 random streams for a batch of 3"):
        sample(Spread(), codes, mask, cfg, generators=example_generators(11, [0, 1], "cpu"))
