"""The LightningModule's pieces: loss on masked tokens only, parameter groups, schedules, checkpointing."""

from __future__ import annotations


from pathlib import Path

import pytest
import torch
import torchmetrics

from vampnet_pl.config import UsageError
from vampnet_pl.model import load_exported
from vampnet_pl.training.module import MaskedTokenModule
from vampnet_pl.training.optim import OptimConfig, lr_multiplier, parameter_groups

MODEL = {"n_codebooks": 4, "n_conditioning_codebooks": 1, "codebook_size": 64, "latent_dim": 8, "d_model": 32,
         "n_layers": 2, "n_heads": 4, "dropout": 0.0}


def module(**kwargs) -> MaskedTokenModule:
    torch.manual_seed(0)
    m = MaskedTokenModule(MODEL, codebook_tables=torch.randn(4, 64, 8), **kwargs)
    m.log = lambda *a, **k: None
    return m


def test_loss_ignores_unmasked_targets():
    m = module(label_smoothing=0.0)
    codes = torch.randint(0, 64, (2, 4, 20))
    mask = torch.zeros(2, 4, 20, dtype=torch.bool)
    mask[:, 1:, :10] = True
    m.masker = lambda c, *a, **k: (mask, torch.full((2,), 0.5))
    loss = m._step({"codes": codes}, "train")
    logits = m.model(codes, mask)[:, :, :10]  # predicted codebooks 1..3, masked frames
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), codes[:, 1:, :10].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-5)
    # Targets of unmasked tokens do not enter the loss: with the logits fixed, changing them changes nothing.
    m.model.forward = lambda c, msk, **_: logits_full
    logits_full = m.model.__class__.forward(m.model, codes, mask)
    changed = codes.clone()
    changed[:, 1:, 10:] = (changed[:, 1:, 10:] + 1) % 64
    assert torch.allclose(m._step({"codes": changed}, "train", sampled=True), loss, atol=1e-5)


@pytest.mark.parametrize("loss_weighting", ["none", "diffusion"])
def test_steps_without_top_k_metrics_give_the_same_loss_and_gradients(loss_weighting):
    """Unsampled steps run the head on masked tokens only; sampled ones on every token, then select."""
    m = module(loss_weighting=loss_weighting)
    codes = torch.randint(0, 64, (3, 4, 24))
    results = []
    for sampled in (True, False):
        torch.manual_seed(3)  # the same masks
        loss = m._step({"codes": codes}, "train", sampled=sampled)
        results.append((loss, torch.autograd.grad(loss, list(m.model.parameters()))))
    (loss_all, grads_all), (loss_masked, grads_masked) = results
    torch.testing.assert_close(loss_masked, loss_all)
    for got, want in zip(grads_masked, grads_all):
        torch.testing.assert_close(got, want)


def test_no_weight_decay_on_norms_embeddings_and_mask_vectors():
    m = module()
    decay, no_decay = parameter_groups(m.model, 0.1)
    names = {id(p): n for n, p in m.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith(("qkv.weight", "out.weight", "ffn_in.weight", "ffn_out.weight", "proj.weight", "head.weight"))
               for n in decayed)
    assert {"embedding.mask_embedding", "position_bias.table.weight", "norm.weight"} <= spared
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_schedules():
    cosine = lr_multiplier(OptimConfig(scheduler="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1), 110, 64)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0) and cosine(10) < 1.0  # the peak once
    assert cosine(59) == pytest.approx(0.55) and cosine(109) == pytest.approx(0.1)  # min_lr at the last of 110 steps
    assert cosine(500) == pytest.approx(0.1)
    noam = lr_multiplier(OptimConfig(lr=1.0, scheduler="noam", warmup_steps=100), 1000, 256)
    peak = 256**-0.5 * 100**-0.5
    assert noam(99) == pytest.approx(peak) and noam(399) == pytest.approx(peak / 2)
    assert noam(10) < noam(50) < noam(99)
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_multiplier(OptimConfig(scheduler="step"), 10, 8)
    with pytest.raises(ValueError, match="warmup_cosine needs an end"):  # no max_steps: it decayed over 100,000
        lr_multiplier(OptimConfig(scheduler="warmup_cosine"), 0, 8)


def test_activation_checkpointing_gives_the_same_gradients():
    plain, checkpointed = module(), module(activation_checkpointing=True)
    checkpointed.configure_model()
    assert all(hasattr(b, "_checkpoint_wrapped_module") for b in checkpointed.model.blocks)
    codes = torch.randint(0, 64, (2, 4, 16))
    mask = torch.rand(2, 4, 16) < 0.5
    for m in (plain, checkpointed):
        m.model(codes, mask).float().square().mean().backward()
    grads = [p.grad for p in plain.model.parameters()], [p.grad for p in checkpointed.model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def _validation_masks(m: MaskedTokenModule, batches: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor, str]:
    """The masks the module fed its model during one validation epoch, the losses, and its protocol digest."""
    seen, forward = [], m.model.forward
    m.model.forward = lambda codes, mask, **kw: seen.append(mask.clone()) or forward(codes, mask, **kw)
    m.model.eval()
    m.on_validation_epoch_start()
    losses = torch.stack([m.validation_step(b, i) for i, b in enumerate(batches)])
    m.on_validation_epoch_end()
    m.model.forward = forward
    return seen, losses, m.protocol_digest


def test_validation_uses_the_protocol_masks_whatever_the_run_masks():
    codes = torch.randint(0, 64, (4, 4, 40))
    batch = {"codes": codes, "index": torch.arange(4)}
    runs = {kind: module(masking={"kind": kind, "schedule": "linear"}) for kind in ("span", "codebook_level", "per_level")}
    results = {}
    for kind, m in runs.items():
        torch.manual_seed(len(kind))  # the global RNG plays no part
        results[kind] = _validation_masks(m, [batch])
    masks = {kind: torch.stack(seen) for kind, (seen, _, _) in results.items()}
    assert masks["span"].shape == (18, 4, 4, 40)  # 10 ratios + 8 prompts
    assert torch.equal(masks["span"], masks["codebook_level"]) and torch.equal(masks["span"], masks["per_level"])
    assert len({digest for _, _, digest in results.values()}) == 1
    # Batching does not matter: the same windows in batches of 1 get the same masks (by window index).
    single, _, digest = _validation_masks(runs["span"], [{"codes": codes[i : i + 1], "index": torch.tensor([i])}
                                                         for i in range(4)])
    per_window = torch.stack(single).view(4, 18, 1, 4, 40).squeeze(2).transpose(0, 1)
    assert torch.equal(per_window, masks["span"])
    # Deterministic: a second epoch of the same module scores the same.
    assert torch.equal(_validation_masks(runs["span"], [batch])[1], results["span"][1])
    # Other windows give another digest.
    assert _validation_masks(runs["span"], [{"codes": (codes + 1) % 64, "index": torch.arange(4)}])[2] != digest


def test_validation_refuses_a_batch_without_window_indices():
    """Indices made up from the batch number would repeat (a smaller last batch, all ranks alike)."""
    m = module()
    m.on_validation_epoch_start()
    with pytest.raises(ValueError, match='needs "index"'):
        m.validation_step({"codes": torch.randint(0, 64, (2, 4, 40))}, 0)


def test_validation_logs_the_protocol_metric_names():
    m = module()
    logged = {}
    m.log = lambda name, value, **k: logged.setdefault(name, value)
    m.model.eval()
    m.validation_step({"codes": torch.randint(0, 64, (2, 4, 40)), "index": torch.arange(2)}, 0)
    expected = {f"val/{n}" for n in m.val_metric_names()}
    assert set(logged) == expected
    assert {"val/loss", "val/acc1", "val/acc25", "val/loss/ratio_0.10", "val/acc25/ratio_1.00",
            "val/acc1/prompt_periodic_16", "val/loss/prompt_compression", "val/acc1/codebook_1",
            "val/loss/codebook_3"} <= expected
    assert "val/loss/codebook_0" not in expected  # a conditioning codebook is never predicted
    assert m.hparams.protocol == "v1" and m.hparams.eval_protocol["ratios"][-1] == 1.0
    for name in ("val/acc1", "val/acc25/ratio_0.50"):
        assert 0.0 <= float(logged[name].compute()) <= 1.0


def test_diffusion_loss_weighting_weights_each_example_by_the_schedule_slope():
    import math

    m = module(label_smoothing=0.0, loss_weighting="diffusion", masking={"schedule": "cosine"})
    codes = torch.randint(0, 64, (3, 4, 20))
    r = torch.tensor([0.1, 0.5, 0.9])
    draw = m.masker.draw(codes, torch.Generator().manual_seed(0), r)
    m.masker.draw = lambda c: draw
    loss = m._step({"codes": codes})
    logits = m.model(codes, draw.mask)
    expected = []
    for b in range(3):
        masked = draw.mask[b, 1:]
        ce = torch.nn.functional.cross_entropy(logits[b][masked], codes[b, 1:][masked])
        expected.append(math.pi / 2 * math.sin(math.pi / 2 * r[b]) * ce)  # |d cos(pi r / 2) / dr|
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="loss_weighting"):
        module(loss_weighting="elbo")


def test_run_dir_is_keyed_on_the_slurm_job(monkeypatch, prepared):
    import hydra

    from vampnet_pl.config import conf_dir

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=["runs_dir=/r", f"data.dataset_dir={prepared}"])
    assert cfg.run_dir == "/r/vampnet-4242"


def test_compile_stays_off_on_cpu_and_fused_adamw_is_the_default_for_plain_tensors():
    from vampnet_pl.training.optim import build_optimizer, use_fused

    assert module().compile_blocks is False  # None: on only when training on CUDA
    assert module(compile=True).compile_blocks is True
    m = module()
    assert use_fused(m.model, None)  # plain CPU parameters: fused AdamW
    assert not use_fused(m.model, False)
    optimizer, _ = build_optimizer(m.model, OptimConfig(), 100, 32)
    assert optimizer.defaults["fused"]
    m.model.head.to("meta")  # a parameter on another device: foreach
    assert not use_fused(m.model, None)


def test_a_non_finite_loss_is_caught_on_cpu_steps_and_sampled_accelerator_steps(monkeypatch):
    m = module(train_metrics_every_n_steps=5)
    m.model.forward = lambda codes, mask, select=None, **_: torch.full(
        (int(select.sum()), 64) if select is not None else (*codes[:, 1:].shape, 64), float("nan"))
    for sampled in (False, True):  # the CPU checks every step
        with pytest.raises(FloatingPointError, match="train loss is nan"):
            m._step({"codes": torch.randint(0, 64, (2, 4, 20))}, "train", sampled=sampled)
    assert all(metric.nan_strategy == "disable" for group in m.metrics.values() for metric in group.values())


def test_token_range_is_checked_on_the_cpu_batch_and_not_again_inside_the_step(monkeypatch):
    m = module()
    size = m.cfg.codebook_size
    codes = torch.randint(0, size, (2, m.cfg.n_codebooks, 12))
    assert m.on_before_batch_transfer({"codes": codes}, 0)["codes"] is codes
    damaged = codes.clone()
    damaged[1, 0, 5] = size
    with pytest.raises(ValueError, match=f"token {size} is outside"):
        m.on_before_batch_transfer({"codes": damaged}, 0)
    calls = []
    original = m.model.forward
    monkeypatch.setattr(m.model, "forward", lambda *a, **k: calls.append(k.get("check_range", True)) or original(*a, **k))
    m._step({"codes": codes}, "train")
    assert calls == [False]  # the step trusts the batch checked before transfer: no host sync per forward


@pytest.mark.parametrize("targets", [["qkv", "out", "ffn_in", "ffn_out", "head"], ["qkv", "proj"]])
def test_a_lora_merge_keeps_the_biases_of_adapted_layers(targets):
    """The paper presets have biases on the input projection and the head; peft moves an adapted layer's bias."""
    import peft

    from vampnet_pl.model import VampNet, VampNetConfig
    from vampnet_pl.training.module import merge_lora_state

    cfg = VampNetConfig(codebook_size=64, dropout=0.0, io_bias=True)
    torch.manual_seed(0)
    adapted = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), VampNet(cfg))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    plain = VampNet(cfg)
    plain.load_state_dict(merge_lora_state(adapted.state_dict(), {"r": 4, "alpha": 8}))
    codes, mask = torch.randint(0, 64, (2, 4, 20)), torch.rand(2, 4, 20) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(codes, mask), adapted.eval()(codes, mask), rtol=1e-4, atol=1e-5)


def test_a_lora_merge_of_bf16_weights_keeps_the_adapters_delta():
    """A bf16-true run saves bf16 weights and adapters; merged in bf16, ``W + B A`` would round a small delta away."""
    w = torch.full((4, 4), 1.0, dtype=torch.bfloat16)  # bf16 steps are 2^-7 at 1.0
    a, b = torch.eye(4, dtype=torch.bfloat16)[:2], torch.full((4, 2), 1e-3, dtype=torch.bfloat16)
    from vampnet_pl.training.module import merge_lora_state

    merged = merge_lora_state({"x.base_layer.weight": w, "x.lora_A.default.weight": a, "x.lora_B.default.weight": b},
                              {"r": 2, "alpha": 2})["x.weight"]
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, w.float() + b.float() @ a.float())


def test_a_checkpoint_loads_with_compile_switched_either_way():
    """Compiling a block adds a level to its state-dict keys: a GPU run (compile on by default) could not be resumed
    with compile off, on the CPU say (activation checkpointing's wrapper hides its own level)."""
    plain, wrapped = module(), module(compile=True, activation_checkpointing=True)
    wrapped.configure_model()  # wraps, compiles nothing yet
    assert any("_orig_mod." in k for k in wrapped.state_dict())
    for source, target in ((plain, wrapped), (wrapped, plain)):
        checkpoint = {"state_dict": {k: v + 1 for k, v in source.state_dict().items()}}
        target.on_load_checkpoint(checkpoint)
        target.load_state_dict(checkpoint["state_dict"])  # strict
        assert torch.equal(target.model.norm.weight, source.model.norm.weight + 1)


def test_init_from_refuses_a_model_exported_with_another_function(tmp_path):
    import dataclasses

    from vampnet_pl.model import VampNet, VampNetConfig, save_exported

    paper = dict(MODEL, embedding="raw", ffn="paper", qkv="separate", io_bias=True, codec_fingerprint="abc")
    source = VampNetConfig(**paper, gelu_approximate="tanh", norm_eps=1e-6, relative_max_distance=128)
    save_exported(tmp_path / "source.pt", VampNet(source, torch.randn(4, 64, 8)))
    # equal shapes, another function: exact GELU, the dtype's eps, another bucket distance
    run = dataclasses.replace(source, gelu_approximate="none", norm_eps=None, relative_max_distance=16)
    with pytest.raises(UsageError) as err:
        MaskedTokenModule(run.to_dict(), init_from=str(tmp_path / "source.pt"))
    message = str(err.value)
    assert "gelu_approximate: 'tanh' in the file, 'none' in this run" in message
    assert "norm_eps: 1e-06 in the file, None in this run" in message
    assert "relative_max_distance: 128 in the file, 16 in this run" in message
    assert "model.relative_max_distance=128 model.gelu_approximate=tanh model.norm_eps=1e-06" in message
    # what only training or the kernels use may differ
    runtime = dataclasses.replace(source, dropout=0.3, attention_backend="sdpa", cpu_matmul="aten")
    MaskedTokenModule(runtime.to_dict(), init_from=str(tmp_path / "source.pt"))


def test_lora_targets_that_match_no_layer_are_refused():
    """q/v targets (the vampnet_lora recipe's) on a fused-qkv model adapted only out/ffn, silently."""
    with pytest.raises(UsageError, match=r"\['q', 'v'\] match no layer of this model \(qkv=fused"):
        module(lora={"r": 2, "target_modules": ["q", "v", "out", "ffn_in", "ffn_out"]})
    adapted = module(lora={"r": 2, "target_modules": ["qkv", "out"]})
    assert {n.split(".")[-4] for n, p in adapted.model.named_parameters() if p.requires_grad} == {"qkv", "out"}


class RootFSDP:
    """Stands in for Lightning's root FSDP module (FSDP (1) itself needs CUDA): records ``clip_grad_norm_``."""

    def __init__(self):
        self.clipped = []

    def clip_grad_norm_(self, max_norm):
        self.clipped.append(max_norm)


@pytest.mark.parametrize("strategy", ["fsdp", "single"])
def test_gradients_are_clipped_by_norm_under_every_strategy(strategy):
    """Lightning's FSDPPrecision refuses clipping by norm (every optimiser step would raise, with the default
    trainer.gradient_clip_val=1.0): under FSDP the root FSDP module clips; elsewhere Lightning does."""
    import lightning as L

    from vampnet_pl.training.parallel import fsdp_strategy

    m = module()
    trainer = L.Trainer(accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False, enable_progress_bar=False,
                        strategy=fsdp_strategy(activation_checkpointing=False) if strategy == "fsdp" else "auto")
    m.trainer = trainer
    trainer.strategy.connect(m)  # as fit does
    if strategy == "fsdp":
        trainer.strategy.model = root = RootFSDP()  # what FSDPStrategy's setup makes of the module
    for p in m.parameters():
        p.grad = torch.full_like(p, 10.0)
    optimizer = torch.optim.AdamW(m.parameters())
    # what Lightning calls after every closure, before the optimiser step
    trainer.precision_plugin._clip_gradients(m, optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
    if strategy == "fsdp":
        assert root.clipped == [1.0]
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()])
        assert norm == pytest.approx(1.0, rel=1e-4)


def test_every_training_metric_is_logged_on_every_sampled_step_even_when_empty():
    """At the epoch end each rank syncs the metrics it logged, one collective each: a metric one rank skipped (no
    example in a mask-ratio bucket) left the other ranks waiting for ever. Empty ones log NaN for the step and add
    nothing to the epoch mean."""
    m = module()
    logged = []
    m.log = lambda name, value, **kwargs: logged.append(name)
    codes = torch.randint(0, 64, (2, 4, 20))
    m.masker = lambda c, *a, **k: (torch.rand(2, 4, 20) < 0.9, torch.full((2,), 0.9))  # every ratio above 0.75
    m._step({"codes": codes}, "train", sampled=True)
    assert len(logged) == len(set(logged)) == len(m.metrics["train_metrics"])  # one log call per metric
    assert "train/top1_masked/ratio_le_0.25" in logged
    bucket = m.metrics["train_metrics"]["top1_masked__ratio_le_0_25"]
    assert torch.isnan(bucket._forward_cache) and bucket.weight == 0


def test_every_validation_metric_is_logged_on_every_batch_even_when_empty(monkeypatch):
    """As in training: a codebook with no masked token in a rank's batch was not logged there (``level.unique()``
    differs between ranks), so the epoch-end sync of the others would wait for ever."""
    from vampnet_pl.training import module as module_file

    m = module()
    logged = []
    m.log = lambda name, value, **kwargs: logged.append(name)
    real = module_file.protocol_masks

    def without_codebook_2(*args, **kwargs):
        masks = real(*args, **kwargs)
        for mask in masks.values():
            mask[:, 2] = False
        return masks

    monkeypatch.setattr(module_file, "protocol_masks", without_codebook_2)
    m.validation_step({"codes": torch.randint(0, 64, (2, 4, 20)), "index": torch.arange(2)}, 0)
    per_condition = len(m.protocol.ratio_names) + len(m.protocol.prompt_names)
    assert sorted(set(logged)) == sorted(f"val/{n}" for n in m.val_metric_names())
    assert logged.count("val/loss/codebook_2") == per_condition
    assert m.val_metrics["loss__codebook_2"].weight == 0


def test_lora_targets_must_be_linear_layers_and_may_be_full_names():
    """peft adapts an embedding too (``table``, the relative position bias): it trained, then the export's merge
    raised a KeyError; a full dotted name, which peft matches, was refused as matching no layer."""
    with pytest.raises(UsageError, match=r"not linear: table \(Embedding position_bias.table\)"):
        module(lora={"r": 2, "target_modules": ["qkv", "table"]})
    with pytest.raises(UsageError, match=r"not linear: ffn \(GEGLU blocks.0.ffn\)"):
        module(lora={"r": 2, "target_modules": ["ffn"]})
    adapted = module(lora={"r": 2, "target_modules": ["blocks.1.attn.qkv"]})
    assert {n.rsplit(".lora_", 1)[0] for n, p in adapted.model.named_parameters() if p.requires_grad} == {"blocks.1.attn.qkv"}
    adapted.plain_model()  # merges


def bytes_read_by_this_process() -> int:
    """``rchar`` of /proc/self/io: every byte this process's reads returned (page cache included)."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/self/io (Linux)")
def test_init_from_reads_its_file_once_and_hashes_it_as_file_sha256(tmp_path):
    """The weights were loaded, then the file read again to hash it (a resume checks the hash): a paper-size
    model was seconds of I/O twice at every start."""
    from vampnet_pl.model import VampNet, VampNetConfig, save_exported
    from vampnet_pl.utils.hashing import file_sha256

    cfg = VampNetConfig(**dict(MODEL, d_model=256, n_layers=4, codec_fingerprint="abc"))
    path = tmp_path / "source.pt"
    save_exported(path, VampNet(cfg, torch.randn(4, 64, 8)))
    size = path.stat().st_size
    assert size > 10_000_000  # well above what else start-up reads
    before = bytes_read_by_this_process()
    loaded = MaskedTokenModule(cfg.to_dict(), init_from=str(path))
    assert bytes_read_by_this_process() - before < 1.2 * size
    assert loaded.init_from_sha256 == file_sha256(path)  # as earlier runs recorded it: they still resume
    source = load_exported(path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.model.state_dict().items())


def test_the_epoch_perplexity_is_exp_of_the_mean_cross_entropy_not_a_mean_of_perplexities():
    """The epoch value averaged each step's exp(cross-entropy): two steps at CE log 64 and about 0 gave about 32.5,
    where the perplexity of those tokens, exp of their mean CE, is about 8. A step's value stays exp of its own CE."""
    m = module()
    target = torch.randint(0, 64, (6,))
    uniform = torch.zeros(6, 64)  # CE = log 64
    certain = torch.full((6, 64), -30.0).scatter(1, target[:, None], 30.0)  # CE about 0
    metric = m.metrics["train_metrics"]["perplexity"]
    steps = []
    for logits in (uniform, certain):
        loss = torch.nn.functional.cross_entropy(logits, target)
        m._update_metrics("train", loss, logits, target, None, target[None, None], torch.ones(1, 1, 6, dtype=torch.bool),
                          torch.ones(1), accuracy=False)
        steps.append(float(metric._forward_cache))
    assert steps == pytest.approx([64.0, 1.0], rel=1e-4)
    assert float(metric.compute()) == pytest.approx(8.0, rel=1e-4)  # exp((log 64 + 0) / 2)


def test_a_bf16_true_run_trains_validates_and_keeps_float32_metric_states():
    """Under ``trainer.precision=bf16-true`` Lightning makes bf16 the default dtype in the steps and converts the whole
    module, metrics included: the per-example and per-window sums (``index_add`` of float32 into a bf16 zeros) raised,
    and a bf16 metric state stops counting at 256."""
    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(1)
    train = [{"codes": torch.randint(0, 64, (2, 4, 20), generator=g)} for _ in range(2)]
    val = [{"codes": torch.randint(0, 64, (2, 4, 20), generator=g), "index": torch.arange(2)}]
    torch.manual_seed(0)
    m = MaskedTokenModule(MODEL, codebook_tables=torch.randn(4, 64, 8), loss_weighting="diffusion")
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(m, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    assert next(m.model.parameters()).dtype == torch.bfloat16  # the run is bf16-true
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    states = [getattr(metric, name) for metric in m.modules() if isinstance(metric, torchmetrics.Metric)
              for name in metric._defaults]
    assert states and all(state.dtype == torch.float32 for state in states)
    accuracy = m.val_metrics["acc1"]
    accuracy.reset()
    for i in range(600):
        accuracy.update(torch.tensor([float(i % 2)]))
    assert float(accuracy.compute()) == 0.5


def _fixed_masks(codes: torch.Tensor, ratios: tuple[float, ...]) -> tuple[torch.Tensor, object]:
    """Examples numbered by their first (conditioning) token, and a masker that gives each example its own mask at
    its ratio in ``ratios``, whichever micro-batch or rank it lands in."""
    codes[:, 0, 0] = torch.arange(codes.shape[0])
    mask = torch.rand(codes.shape, generator=torch.Generator().manual_seed(0)) < torch.tensor(ratios)[:, None, None]
    mask[:, 0], mask[:, 1:, 0] = False, True  # conditioning never masked; at least one masked token each
    ratio = torch.tensor(ratios)
    return mask, lambda c, *a, **k: (mask[c[:, 0, 0]], ratio[c[:, 0, 0]])


def _one_sgd_step(codes: torch.Tensor, ratios: tuple[float, ...], batch_size: int, accumulation: int,
                  loss_weighting: str = "none") -> torch.Tensor:
    """The change of the weights after one optimiser step (SGD at lr 1, no clipping): minus the step's gradient."""
    import lightning as L
    from torch.utils.data import DataLoader

    m = module(label_smoothing=0.0, loss_weighting=loss_weighting)
    _, m.masker = _fixed_masks(codes, ratios)
    m.configure_optimizers = lambda: torch.optim.SGD(m.model.parameters(), lr=1.0)
    m.on_train_start = lambda: None
    before = torch.cat([p.detach().flatten() for p in m.model.parameters()])
    L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulation, gradient_clip_val=None, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
              ).fit(m, DataLoader([{"codes": c} for c in codes], batch_size=batch_size))
    return before - torch.cat([p.detach().flatten() for p in m.model.parameters()])


def test_gradient_accumulation_weighs_every_masked_token_of_the_global_batch_alike():
    """The global batch is the recipe and its split is the hardware's: 2 micro-batches of 2 accumulated give the
    gradient of one batch of 4, the mean over all its masked tokens. A mean per micro-batch, averaged, gave the tokens
    of the lightly masked micro-batch (14 tokens against 89) 6 times the weight: a gradient 106 % apart."""
    codes = torch.randint(0, 64, (4, 4, 16), generator=torch.Generator().manual_seed(1))
    ratios = (0.1, 0.1, 0.9, 0.9)
    whole = _one_sgd_step(codes, ratios, batch_size=4, accumulation=1)
    m = module(label_smoothing=0.0)
    mask, m.masker = _fixed_masks(codes.clone(), ratios)
    loss = m.masked_loss(codes, sampled=False).loss  # the mean over the batch's masked tokens
    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(m.model.parameters()))])
    torch.testing.assert_close(whole, gradient, rtol=1e-4, atol=1e-6)
    accumulated = _one_sgd_step(codes, ratios, batch_size=2, accumulation=2)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
    # micro_batch (the original's pooling): the mean of the micro-batches' own means, split-dependent
    halves = [torch.cat([g.flatten() for g in torch.autograd.grad(m.masked_loss(codes[i:i + 2], sampled=False).loss,
                                                                  list(m.model.parameters()))]) for i in (0, 2)]
    mean_of_means = (halves[0] + halves[1]) / 2
    torch.testing.assert_close(_one_sgd_step(codes, ratios, 2, 2, "micro_batch"), mean_of_means, rtol=1e-4, atol=1e-6)
    assert torch.equal(_one_sgd_step(codes, ratios, 4, 1, "micro_batch"), whole)  # one rank, no accumulation: as before
    assert (mean_of_means - whole).norm() > 0.5 * whole.norm()


def test_token_mean_scale_undoes_the_accumulation_and_rank_averages():
    from vampnet_pl.training.module import token_mean_scale

    # 2 micro-batches x 2 ranks of 60 positions, 100 masked tokens in all: (2 x 2 x 60) / 100
    assert float(token_mean_scale(2, 2, 60, torch.tensor(100.0))) == pytest.approx(2.4)
