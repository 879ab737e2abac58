"""GPU checks and throughput (run where a GPU is lent; needs torch, lightning, torchmetrics, peft, deepspeed).

    PYTHONPATH=src python bench/bench_gpu.py --check-strategies --throughput paper small

1. --check-strategies: the GPU-only strategies (Lightning FSDPStrategy, DeepSpeed ZeRO-2 and -3)
   train a tiny coarse model a few bf16 steps, save their (sharded) checkpoint, and the export
   command turns it into one portable model file that loads with weights_only=True.
2. --throughput: tokens/s and model FLOPs utilisation (MFU) of the Lightning training step,
   bf16-mixed, one GPU, 10 s windows (861 frames) for the given sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SIZES  # noqa: E402

from vampnet_pl.training import parallel  # noqa: E402
from vampnet_pl.training.export import export_checkpoint  # noqa: E402
from vampnet_pl.model import load_exported  # noqa: E402
from vampnet_pl.training.module import MaskedTokenModule  # noqa: E402
from vampnet_pl.training.performance import dense_bf16_tflops  # noqa: E402


def module_and_loader(size: str, batch: int, frames: int, steps: int, n_codebooks: int = 4, position: str = "relative",
                      compile: bool | None = False, attention_backend: str = "auto", activation_checkpointing: bool = False,
                      dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = dict(n_codebooks=n_codebooks, codebook_size=1024, latent_dim=1024, dropout=dropout, position=position,
               attention_backend=attention_backend, **SIZES[size])
    module = MaskedTokenModule(cfg, optim={"lr": 3e-4, "warmup_steps": 10}, compile=compile,
                               activation_checkpointing=activation_checkpointing,
                               codebook_tables=torch.randn(n_codebooks, 1024, 1024))
    data = [{"codes": torch.randint(0, 1024, (batch, n_codebooks, frames))} for _ in range(steps)]
    return module, torch.utils.data.DataLoader(data, batch_size=None)


def check_strategies() -> None:
    strategies = {
        "fsdp": parallel.fsdp_strategy(),
        "deepspeed_zero2": parallel.deepspeed_strategy(stage=2, batch_size=4),
        "deepspeed_zero3": parallel.deepspeed_strategy(stage=3, batch_size=4),
    }
    for name, strategy in strategies.items():
        with tempfile.TemporaryDirectory() as tmp:
            module, loader = module_and_loader("tiny", 4, 172, 3)
            trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", strategy=strategy, max_steps=3,
                                logger=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=tmp, enable_checkpointing=False)
            trainer.fit(module, loader)
            checkpoint = Path(tmp) / "last.ckpt"
            trainer.save_checkpoint(checkpoint)
            kind = "folder" if checkpoint.is_dir() else "file"
            model = load_exported(export_checkpoint(checkpoint, Path(tmp) / "model.pt"))
            loss = trainer.callback_metrics.get("train/loss_step", torch.tensor(float("nan")))
            print(f"| {name} | trained 3 bf16 steps (loss {float(loss):.3f}), checkpoint is a {kind} | "
                  f"exported: {model.num_parameters():,} parameters, weights_only load OK |", flush=True)


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup = warmup

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.warmup:
            synchronize()
            self.started = time.perf_counter()

    def on_train_end(self, trainer, *args):
        synchronize()
        self.seconds = time.perf_counter() - self.started


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(size: str, batch: int, frames: int, steps: int, warmup: int, position: str = "relative",
            compile: bool | None = None, attention_backend: str = "auto", activation_checkpointing: bool = False,
            strategy: str = "auto", dropout: float = 0.0) -> dict:
    """Tokens/s, model TFLOP/s, MFU and peak memory of the Lightning training step (bf16-mixed on a GPU).

    Without CUDA (``--smoke``) it runs on CPU in fp32: the code path is checked, the numbers mean nothing.
    """
    import resource

    cuda = torch.cuda.is_available()
    module, loader = module_and_loader(size, batch, frames, steps + warmup, position=position, compile=compile,
                                       attention_backend=attention_backend,
                                       activation_checkpointing=activation_checkpointing, dropout=dropout)
    if cuda:
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                        strategy=parallel.fsdp2_strategy() if strategy == "fsdp2" else "auto",
                        max_steps=steps + warmup, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, loader)
    tokens_per_s = steps * batch * frames / timer.seconds
    flops = module.model.flops_per_token(frames) * tokens_per_s
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = dense_bf16_tflops(name)
    memory = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"parameters": module.model.num_parameters(), "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
            "mfu": flops / (peak * 1e12) if peak else None, "peak_gib": memory / 2**30,
            "compiled": module.compile_blocks}


def throughput(size: str, batch: int, frames: int, steps: int, warmup: int, position: str, compile: bool) -> None:
    module, loader = module_and_loader(size, batch, frames, steps + warmup, position=position, compile=compile)
    torch.set_float32_matmul_precision("high")
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps + warmup, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, loader)
    tokens_per_s = steps * batch * frames / timer.seconds
    flops = module.model.flops_per_token(frames) * tokens_per_s
    name = torch.cuda.get_device_name()
    peak = dense_bf16_tflops(name)
    mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "n/a"
    memory = torch.cuda.max_memory_allocated() / 2**30
    print(f"| {size}, {position}{', compiled' if compile else ''} | {module.model.num_parameters() / 1e6:.0f} M | {batch} x {frames} | {tokens_per_s:,.0f} | "
          f"{flops / 1e12:.0f} | {mfu} | {memory:.1f} |", flush=True)
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-strategies", action="store_true")
    parser.add_argument("--throughput", nargs="*", default=[])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=861)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--positions", nargs="+", default=["relative"], help="relative and/or rotary")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    if args.check_strategies:
        print("| strategy | training | export |\n|---|---|---|")
        check_strategies()
    if args.throughput:
        print("\n| size | parameters | batch x frames | tokens/s | model TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|---|---|")
        for size in args.throughput:
            for position in args.positions:
                throughput(size, args.batch, args.frames, args.steps, args.warmup, position, args.compile)


if __name__ == "__main__":
    main()
