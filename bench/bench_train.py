"""Training throughput on CPU: the Lightning module vs a plain PyTorch loop, and vs the original VampNet.

    .venv/bin/python bench/bench_train.py --sizes tiny small --steps 30
    .venv/bin/python bench/bench_train.py --sizes small --original /work/orig/vampnet-ismir --steps 10

Each (size, loop) runs in its own process (peak RSS is per process). Tokens are sequence
positions (frames) x batch. Prints a Markdown table for BENCHMARKS.md.

``--original PATH`` (a checkout of the original VampNet, its dependencies importable: audiotools,
einops, loralib) adds a side-by-side comparison of one training step at the same size: masking,
embedding, forward, masked cross-entropy (label smoothing 0.1), backward, gradient clipping, AdamW
and the learning-rate schedule, no metrics on either side. Each side runs in its own process,
alternating ours / original for ``--rounds`` rounds; see :func:`compare_with_original`.
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


def make(size: str, batch: int, frames: int, seed: int = 0, latent_dim: int = 128, **model_kwargs):
    from vampnet_pl.training.module import MaskedTokenModule

    torch.manual_seed(seed)
    model_cfg = dict(n_codebooks=4, codebook_size=1024, latent_dim=latent_dim, dropout=0.1, **SIZES[size], **model_kwargs)
    module = MaskedTokenModule(model_cfg, optim={"lr": 3e-4, "warmup_steps": 10},
                               codebook_tables=torch.randn(4, 1024, latent_dim))
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


def original_step_fn(path: str, size: str, batch: int, frames: int, seed: int = 0):
    """One training step of the original VampNet (its model, masks and loss), as its train loop runs it."""
    from types import SimpleNamespace

    sys.path.insert(0, path)
    from vampnet import mask as pmask
    from vampnet.modules.transformer import VampNet as OriginalVampNet
    from vampnet.scheduler import NoamScheduler
    from vampnet.util import codebook_flatten

    torch.manual_seed(seed)
    width = SIZES[size]
    model = OriginalVampNet(n_heads=width["n_heads"], n_layers=width["n_layers"], n_codebooks=4, latent_dim=8,
                            embedding_dim=width["d_model"], vocab_size=1024, flash_attn=False, dropout=0.1).train()
    codec = SimpleNamespace(quantizer=SimpleNamespace(  # from_codes reads the codec's codebook tables
        quantizers=[SimpleNamespace(codebook=torch.nn.Embedding(1024, 8).requires_grad_(False)) for _ in range(4)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = NoamScheduler(optimizer, d_model=width["d_model"])
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    batches = [torch.randint(0, 1024, (batch, 4, frames)) for _ in range(8)]

    def step(i: int) -> None:
        z = batches[i % len(batches)]
        mask = pmask.codebook_unmask(pmask.random(z, torch.rand(batch)), model.n_conditioning_codebooks)
        z_mask, mask = pmask.apply_mask(z, mask, model.mask_token)
        z_hat = model(model.embedding.from_codes(z_mask, codec))
        target = codebook_flatten(z).masked_fill(~codebook_flatten(mask).bool(), -100)
        criterion(z_hat, target).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    return step, sum(p.numel() for p in model.parameters())


def our_step_fn(size: str, batch: int, frames: int, seed: int = 0, **model_kwargs):
    """Our training step: MaskedTokenModule._step (masking, loss) + backward, clipping, AdamW, schedule.
    ``model_kwargs``: further ``VampNetConfig`` fields (``bench/bench_cpu_layers.py`` sets ``cpu_matmul``)."""
    from vampnet_pl.training.optim import build_optimizer

    # GEGLU hidden width 2 d_model, as the original's feed-forward: the same size, parameter for parameter
    module, batches = make(size, batch, frames, seed, latent_dim=8, ffn_mult=3.0, **model_kwargs)
    module.log = lambda *a, **k: None
    module._update_metrics = lambda *a, **k: None  # the original's step is timed without its metrics too
    optimizer, scheduler = build_optimizer(module.model, module.optim_cfg, 10_000, module.cfg.d_model)

    def step(i: int) -> None:
        loss = module._step(batches[i % len(batches)], "train", sampled=False)  # a step without top-k metrics
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return step, module.model.num_parameters()


def time_steps(sides: list[str], size: str, batch: int, frames: int, steps: int, warmup: int,
               original: str | None) -> dict:
    """Median wall and process-CPU seconds of ``steps`` training steps after ``warmup``, per side; with two
    sides, both in this process, their steps alternating."""
    import statistics

    built = {side: our_step_fn(size, batch, frames) if side == "ours" else original_step_fn(original, size, batch, frames)
             for side in sides}
    wall, cpu = {side: [] for side in sides}, {side: [] for side in sides}
    for i in range(warmup + steps):
        for side, (step, _) in built.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            step(i)
            if i >= warmup:
                wall[side].append(time.perf_counter() - started)
                cpu[side].append(time.process_time() - cpu_started)
    return {side: {"wall": statistics.median(wall[side]), "cpu": statistics.median(cpu[side]),
                   "parameters": built[side][1]} for side in sides}


def compare_with_original(path: str | None, sizes, batch: int, frames: int, steps: int, warmup: int,
                          rounds: int = 3, threads: int = 0) -> list[str]:
    """Our training step against the original's. Each side runs in its own process (so neither inherits the
    other's heap), alternating ours / original ``rounds`` times: per side the median over rounds of each
    round's median step, and the median of the per-round ratios. Then one more process runs both, their steps
    alternating (the method of earlier runs of this benchmark): its ratio is the last column. Without
    ``path``: our column only."""
    import statistics

    rows = ["| size | parameters ours / original | ours s/step | original s/step | tokens/s ours / original | speed-up | "
            "CPU-time speed-up | speed-up per round | speed-up, one process |", "|---|---|---|---|---|---|---|---|---|"]

    def run(sides: list[str], size: str) -> dict:
        command = [sys.executable, __file__, "--time-steps", *sides, "--size", size, "--batch", str(batch),
                   "--frames", str(frames), "--steps", str(steps), "--warmup", str(warmup),
                   "--threads", str(threads)] + (["--original", path] if path else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' + '.join(sides)} {size} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    tokens = batch * frames
    for size in sizes:
        if not path:
            ours = [run(["ours"], size)["ours"] for _ in range(rounds)]
            mine = statistics.median(r["wall"] for r in ours)
            rows.append(f"| {size} | {ours[0]['parameters'] / 1e6:.1f} M / - | {mine:.3f} | - | {tokens / mine:,.0f} / - "
                        "| - | - | - | - |")
            print(rows[-1], flush=True)
            continue
        ours, theirs_runs = [], []
        for _ in range(rounds):
            ours.append(run(["ours"], size)["ours"])
            theirs_runs.append(run(["original"], size)["original"])
        together = run(["ours", "original"], size)
        mine, theirs = statistics.median(r["wall"] for r in ours), statistics.median(r["wall"] for r in theirs_runs)
        ratios = [t["wall"] / o["wall"] for o, t in zip(ours, theirs_runs)]
        cpu_ratio = statistics.median(t["cpu"] / o["cpu"] for o, t in zip(ours, theirs_runs))
        rows.append(f"| {size} | {ours[0]['parameters'] / 1e6:.1f} M / {theirs_runs[0]['parameters'] / 1e6:.1f} M | "
                    f"{mine:.3f} | {theirs:.3f} | {tokens / mine:,.0f} / {tokens / theirs:,.0f} | "
                    f"**{statistics.median(ratios):.2f}x** | {cpu_ratio:.2f}x | {', '.join(f'{r:.2f}' for r in ratios)} | "
                    f"{together['original']['wall'] / together['ours']['wall']:.2f}x |")
        print(rows[-1], flush=True)
    return rows


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
    parser.add_argument("--time-steps", nargs="+", choices=["ours", "original"], help="(internal) time these sides")
    parser.add_argument("--rounds", type=int, default=3, help="with --original: alternating processes per side")
    parser.add_argument("--size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--original", help="checkout of the original VampNet: compare training steps side by side")
    args = parser.parse_args()
    if args.time_steps:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = time_steps(args.time_steps, args.size, args.batch, args.frames, args.steps, args.warmup, args.original)
        return print(json.dumps(result))
    if args.child:
        args.loop = args.child
        return child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.original:
        print(f"training step, ours vs the original VampNet: batch {args.batch} x {args.frames} frames, 4 codebooks, "
              f"{args.rounds} rounds of one process per side, median of {args.steps} steps after {args.warmup}\n")
        compare_with_original(args.original, args.sizes, args.batch, args.frames, args.steps, args.warmup, args.rounds,
                              args.threads)
        return
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
