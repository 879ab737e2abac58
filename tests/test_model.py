"""The transformer: one class for coarse and c2f, bidirectional, masked inputs, export."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from vampnet_pl.config import conf_dir
from vampnet_pl.model import VampNet, VampNetConfig, load_exported, save_exported
from vampnet_pl.model.vampnet import packed


def tiny(**overrides) -> VampNet:
    cfg = VampNetConfig(**{**dict(n_codebooks=6, n_conditioning_codebooks=2, codebook_size=32, latent_dim=8, d_model=32,
                                  n_layers=2, n_heads=4, dropout=0.0, codec_fingerprint="abc"), **overrides})
    torch.manual_seed(0)
    return VampNet(cfg, torch.randn(cfg.n_codebooks, cfg.codebook_size, cfg.latent_dim)).eval()


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_logits_cover_the_predicted_codebooks(position):
    model = tiny(position=position)
    codes = torch.randint(0, 32, (3, 6, 40))
    logits = model(codes, torch.rand(3, 6, 40) < 0.5)
    assert logits.shape == (3, 4, 40, 32)
    coarse = tiny(n_conditioning_codebooks=0, n_codebooks=4)
    assert coarse(codes[:, :4], torch.ones(3, 4, 40, dtype=torch.bool)).shape == (3, 4, 40, 32)


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_attention_is_bidirectional(position):
    model = tiny(position=position)
    codes = torch.randint(0, 32, (1, 6, 30))
    mask = torch.zeros(1, 6, 30, dtype=torch.bool)
    before = model(codes, mask)
    codes[..., -1] = (codes[..., -1] + 1) % 32  # change the last frame only
    after = model(codes, mask)
    assert not torch.allclose(before[..., 0, :], after[..., 0, :])  # the first frame sees the future


def test_masked_tokens_hide_their_content():
    model = tiny()
    codes = torch.randint(0, 32, (1, 6, 20))
    mask = torch.zeros(1, 6, 20, dtype=torch.bool)
    mask[:, 3, 5] = True
    before = model(codes, mask)
    codes[:, 3, 5] = (codes[:, 3, 5] + 7) % 32
    assert torch.allclose(before, model(codes, mask), atol=1e-6)


def test_codebook_tables_are_frozen_buffers_in_the_state_dict():
    model = tiny()
    assert "embedding.codebook_tables" in model.state_dict()
    assert all("codebook_tables" not in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="do not fit"):
        VampNet(model.cfg, torch.zeros(2, 2, 2))


def test_no_biases_anywhere():
    assert all(not name.endswith(".bias") for name, _ in tiny().named_parameters())


def test_export_round_trip_loads_with_weights_only(tmp_path):
    model = tiny()
    save_exported(tmp_path / "m.pt", model)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["codec_fingerprint"] == "abc"
    loaded = load_exported(tmp_path / "m.pt").eval()
    codes = torch.randint(0, 32, (2, 6, 16))
    mask = torch.rand(2, 6, 16) < 0.5
    assert torch.equal(model(codes, mask), loaded(codes, mask))


def test_export_of_a_compiled_model_with_compiled_blocks_loads(tmp_path):
    """torch.compile adds a level to the state dict's keys (``_orig_mod.``; ``parallelize`` compiles each block): the
    file holds the plain model's keys, and a file written with wrapped keys loads too."""
    model = tiny().eval()
    codes, mask = torch.randint(0, 32, (2, 6, 16)), torch.rand(2, 6, 16) < 0.5
    expected = model(codes, mask)
    model.blocks[0] = torch.compile(model.blocks[0])  # lazy: nothing compiles before a call
    compiled = torch.compile(model)
    assert "_orig_mod.blocks.0._orig_mod.attn.out.weight" in compiled.state_dict()
    save_exported(tmp_path / "m.pt", compiled)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(payload["state_dict"]) == set(tiny().state_dict())
    assert torch.equal(load_exported(tmp_path / "m.pt")(codes, mask), expected)
    payload["state_dict"] = {f"_orig_mod.{k}": v for k, v in payload["state_dict"].items()}  # as written before
    torch.save(payload, tmp_path / "wrapped.pt")
    assert torch.equal(load_exported(tmp_path / "wrapped.pt")(codes, mask), expected)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        VampNetConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_conditioning_codebooks"):
        VampNetConfig(n_codebooks=4, n_conditioning_codebooks=4)
    with pytest.raises(ValueError, match="position must be one of"):
        VampNetConfig(position="absolute")
    # T5 buckets: no exact bucket, or a max distance within the exact ones (it gave buckets that wrapped around
    # the table, or an IndexError at index -2**63)
    with pytest.raises(ValueError, match="relative_buckets must be at least 4"):
        VampNetConfig(relative_buckets=2)
    for max_distance in (4, 8):
        with pytest.raises(ValueError, match=f"relative_max_distance={max_distance} must exceed relative_buckets // 4"):
            VampNetConfig(relative_buckets=32, relative_max_distance=max_distance)
    VampNetConfig(relative_buckets=32, relative_max_distance=9)
    VampNetConfig(position="rotary", relative_max_distance=4)  # no relative bias: not read
    # rotary on an odd head width broadcast the lone last dimension into q and k, one wider than v (no error)
    with pytest.raises(ValueError, match="head width d_model / n_heads = 3 must be even"):
        VampNetConfig(position="rotary", d_model=12, n_heads=4)
    VampNetConfig(position="relative", d_model=12, n_heads=4)
    for name in ("n_heads", "n_layers", "d_model"):  # n_heads=0 was a ZeroDivisionError, n_layers=0 a model of no layers
        with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
            VampNetConfig(**{name: 0})
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        VampNetConfig(dropout=1.5)


@pytest.mark.parametrize("bad, message", [("model.n_heads=0", "n_heads must be at least 1"),
                                          ("model.dropout=-0.1", "dropout must be in")])
def test_bad_model_settings_fail_at_compose_time(bad, message):
    from vampnet_pl.config import UsageError, compose

    with pytest.raises(UsageError, match=message):
        compose("train", ["data.dataset_dir=codes", bad])


@pytest.mark.parametrize("name, layers, width, heads, predicted", [
    ("coarse_paper", 20, 1280, 20, 4), ("c2f_paper", 16, 1280, 20, 10),
    ("coarse_small", 8, 512, 8, 4), ("c2f_tiny", 2, 64, 4, 10)])
def test_size_presets(name, layers, width, heads, predicted):
    raw = OmegaConf.load(conf_dir() / "model" / f"{name}.yaml")
    cfg = VampNetConfig(**{k: v for k, v in raw.items() if k != "defaults"}, codebook_size=1024, latent_dim=8)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_predicted_codebooks) == (layers, width, heads, predicted)
    original = {"coarse_paper": 333_022_368, "c2f_paper": 275_449_072}  # the original's, less its loralib adapters
    if name in original:  # and weight-norm gains (folded at import); counted by instantiating the original
        with torch.device("meta"):
            model = VampNet(cfg)
        assert model.num_parameters() == original[name]


@pytest.mark.parametrize("switch", [dict(qkv="separate"), dict(ffn="paper"), dict(io_bias=True),
                                    dict(gelu_approximate="tanh", norm_eps=1e-6), dict(embedding="raw")])
def test_architecture_switches_build_and_run(switch):
    model = tiny(**switch)
    codes = torch.randint(0, 32, (2, 6, 12))
    assert model(codes, torch.rand(2, 6, 12) < 0.5).shape == (2, 4, 12, 32)
    names = dict(model.named_parameters())
    if switch.get("qkv") == "separate":
        assert {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight"} <= set(names)
    if switch.get("ffn") == "paper":  # the original's GEGLU: w_1 d -> 4d, w_2 2d -> d
        assert names["blocks.0.ffn.ffn_in.weight"].shape == (128, 32)
        assert names["blocks.0.ffn.ffn_out.weight"].shape == (32, 64)
    if switch.get("io_bias"):
        assert {"embedding.proj.bias", "head.bias"} <= set(names)
    with pytest.raises(ValueError, match="must be one of"):
        VampNetConfig(**{**{k: "nonsense" for k in switch if isinstance(switch[k], str)}, "qkv": "nonsense"})


def test_codes_out_of_range_are_refused():
    model = tiny()
    codes = torch.randint(0, 32, (1, 6, 8))
    codes[0, 2, 3] = 32
    with pytest.raises(ValueError, match=r"outside \[0, 32\)"):
        model(codes, torch.zeros(1, 6, 8, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32])
def test_codes_of_any_integer_dtype_are_read_and_range_checked(dtype):
    """The shards store uint16 codes; torch has no CPU aminmax for uint16 and uint32, so the range check raised
    NotImplementedError on them."""
    model = tiny()
    codes, mask = torch.randint(0, 32, (1, 6, 8)), torch.rand(1, 6, 8) < 0.5
    assert torch.equal(model(codes.to(dtype), mask), model(codes, mask))
    codes[0, 2, 3] = 32
    with pytest.raises(ValueError, match=r"token 32 is outside \[0, 32\)"):
        model(codes.to(dtype), mask)


def test_masks_and_selections_of_another_shape_are_refused():
    """A mask of the predicted codebooks only broadcast over every codebook (conditioning ones masked too), and a
    selection of every codebook was split as if its first rows were the predicted codebooks': silent wrong logits."""
    model = tiny()  # 6 codebooks, 2 conditioning
    codes = torch.randint(0, 32, (2, 6, 16))
    for mask in (torch.ones(2, 1, 16, dtype=torch.bool), torch.ones(2, 6, 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"must have the codes' shape \(2, 6, 16\)"):
            model(codes, mask)
    mask = torch.zeros(2, 6, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"select \(2, 6, 16\) must be .* = \(2, 4, 16\)"):
        model(codes, mask, select=torch.ones(2, 6, 16, dtype=torch.bool))


def test_position_bias_is_built_once_per_length_inside_position_bias_reused():
    model = VampNet(VampNetConfig(n_codebooks=2, codebook_size=16, latent_dim=4, d_model=16, n_layers=2, n_heads=2)).eval()
    bias = model.position_bias
    assert bias(9) is not bias(9)  # outside the block: built on every call (training changes the table)
    with torch.no_grad(), model.position_bias_reused():
        assert bias(9) is bias(9) and bias(11) is not bias(9)
        codes, mask = torch.randint(0, 16, (1, 2, 9)), torch.zeros(1, 2, 9, dtype=torch.bool)
        inside = model(codes, mask)
    assert bias.reused is None
    assert torch.equal(inside, model(codes, mask))


def test_packed_order_is_codebook_then_example_then_frame():
    values = torch.arange(2 * 3 * 5).view(2, 3, 5)  # [example, codebook, frame]
    select = torch.rand(2, 3, 5) < 0.6
    order = [(c, b, t) for c in range(3) for b in range(2) for t in range(5) if select[b, c, t]]
    assert packed(values, select).tolist() == [values[b, c, t].item() for c, b, t in order]


def gather_head_weight_in_its_forward(model: VampNet) -> None:
    """As DeepSpeed ZeRO-3 holds a weight: an empty placeholder, made whole by a hook of its own module."""
    whole = model.head.weight
    model.head.weight = torch.nn.Parameter(torch.empty(0))

    def gather(module, args):
        module.weight = whole

    def release(module, args, output):
        module.weight = torch.nn.Parameter(torch.empty(0))

    model.head.register_forward_pre_hook(gather)
    model.head.register_forward_hook(release)


@pytest.mark.parametrize("switch", [{}, dict(io_bias=True), dict(lora_head=True), dict(partitioned_head=True)])
def test_selected_logits_are_the_full_logits_of_the_selected_tokens(switch):
    model = tiny(**{k: v for k, v in switch.items() if k not in ("lora_head", "partitioned_head")})
    if switch.get("lora_head"):  # an adapted head: its own forward must run (the LoRA delta is not zero here)
        import peft

        config = peft.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False)
        model = peft.inject_adapter_in_model(config, model)
        assert type(model.head) is not torch.nn.Linear
    if switch.get("partitioned_head"):
        gather_head_weight_in_its_forward(model)
    codes = torch.randint(0, 32, (3, 6, 17))
    mask = torch.rand(3, 6, 17) < 0.5
    select = mask[:, 2:]
    full, selected = model(codes, mask), model(codes, mask, select=select)
    assert selected.shape == (int(select.sum()), 32)
    torch.testing.assert_close(selected, packed(full, select))
    weights = torch.randn_like(selected)
    params = [p for p in model.parameters() if p.requires_grad]
    by_selected = torch.autograd.grad((selected * weights).sum(), params, allow_unused=True)
    by_full = torch.autograd.grad((packed(full, select) * weights).sum(), params, allow_unused=True)
    for got, want in zip(by_selected, by_full):  # sums of the same terms in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_selected_heads_gradients_repeat_exactly(device):
    """A frame masked in several codebooks is gathered once for each; the sum of its gradients must not depend on
    thread timing (advanced indexing's CPU backward adds them atomically: a few in 40 runs differed there; on
    CUDA, index_select's does). On the CPU with two threads, as CI has."""
    model = tiny(n_codebooks=4, n_conditioning_codebooks=0, d_model=64).to(device)
    features = torch.randn(4, 344, 64, device=device, requires_grad=True)
    select = torch.rand(4, 4, 344, device=device) < 0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = [torch.autograd.grad(model.classify_selected(features, select).square().sum(), features)[0]
                 for _ in range(100)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)
