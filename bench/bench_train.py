"""Training throughput on CPU: the Lightning module vs a plain PyTorch loop over the same model and data.

    .venv/bin/python bench/bench_train.py --sizes tiny small --steps 30

Each (size, loop) runs in its own process (peak RSS is per process). Tokens are sequence
positions (frames) x batch. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SIZES = {  # as conf/model/coarse_{size}.yaml
    "tiny": dict(d_model=64, n_layers=2, n_heads=4),
    "small": dict(d_model=512, n_layers=8, n_heads=8),
    "paper": dict(d_model=1280, n_layers=20, n_heads=20),
}


def make(size: str, batch: int, frames: int, seed: int = 0):
    from vampnet_pl.training.module import MaskedTokenModule

    torch.manual_seed(seed)
    model_cfg = dict(n_codebooks=4, codebook_size=1024, latent_dim=128, dropout=0.1, **SIZES[size])
    module = MaskedTokenModule(model_cfg, optim={"lr": 3e-4, "warmup_steps": 10}, codebook_tables=torch.randn(4, 1024, 128))
    batches = [{"codes": torch.randint(0, 1024, (batch, 4, frames))} for _ in range(8)]
    return module, batches


def run_plain(size, batch, frames, steps, warmup):
    from vampnet_pl.training.optim import build_optimizer

    module, batches = make(size, batch, frames)
    optimizer, scheduler = build_optimizer(module.model, module.optim_cfg, steps + warmup, module.cfg.d_model)
    module.log = lambda *a, **k: None  # the plain loop has no logger
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        loss = module._step(batches[step % len(batches)], "train")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - started


def run_lightning(size, batch, frames, steps, warmup):
    import lightning as L

    module, batches = make(size, batch, frames)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                self.started = time.perf_counter()

    timer = Timer()
    loader = torch.utils.data.DataLoader([batches[i % len(batches)] for i in range(warmup + steps)], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, loader)
    return time.perf_counter() - timer.started


def child(args) -> None:
    fn = run_plain if args.loop == "plain" else run_lightning
    seconds = fn(args.size, args.batch, args.frames, args.steps, args.warmup)
    tokens = args.steps * args.batch * args.frames
    print(json.dumps({"tokens_per_s": tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=344)  # 4 s of DAC 44.1 kHz frames
    parser.add_argument("--child", choices=["plain", "lightning"])
    parser.add_argument("--size")
    args = parser.parse_args()
    if args.child:
        args.loop = args.child
        return child(args)
    print(f"batch {args.batch} x {args.frames} frames, 4 codebooks, {args.steps} timed steps after {args.warmup}, "
          f"{torch.get_num_threads()} threads\n")
    print("| size | plain PyTorch tokens/s | Lightning tokens/s | Lightning / plain | peak RSS plain / Lightning (MB) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        results = {}
        for loop in ("plain", "lightning", "plain", "lightning"):  # interleaved, best of two each
            done = subprocess.run([sys.executable, __file__, "--child", loop, "--size", size, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--frames", str(args.frames)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            best = results.get(loop)
            if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
                results[loop] = result
        plain, lit = results["plain"], results["lightning"]
        print(f"| {size} | {plain['tokens_per_s']:,.0f} | {lit['tokens_per_s']:,.0f} | "
              f"{lit['tokens_per_s'] / plain['tokens_per_s']:.3f} | {plain['peak_rss_mb']:.0f} / {lit['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
