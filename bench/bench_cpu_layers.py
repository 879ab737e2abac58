"""CPU fp32 layers: linear products in MKL (torch's ``F.linear``) against oneDNN (``vampnet_pl.model.linear``),
and ``nn.RMSNorm`` against ``vampnet_pl.model.norm.RMSNorm``.

    PYTHONPATH=src .venv/bin/python bench/bench_cpu_layers.py            # the small model's layers
    PYTHONPATH=src .venv/bin/python bench/bench_cpu_layers.py --step     # and whole training steps

Per layer shape of the small coarse model (batch 8 x 344 frames), each product of a training step:
forward ``x @ W.T``, input gradient ``g @ W``, weight gradient ``g.T @ x``, in GFLOP/s by MKL (aten) and
by oneDNN, then a whole layer forward + backward, ``F.linear`` against ``linear``; then RMSNorm forward +
backward on a ``[tokens, 512]`` activation, torch's composite ops against our function. Medians of
``--repeats``, every row alternating in one process (this machine's speed drifts by 10% over minutes).

``--step``: whole training steps of the small model as ``bench/bench_train.py`` times them, two modules
with the same weights, ``cpu_matmul=aten`` and ``auto``, their steps alternating: the median of the
per-pair ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vampnet_pl.model.linear import linear, onednn_available
from vampnet_pl.model.norm import RMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_attention import alternating  # noqa: E402

SMALL_LAYERS = [("qkv", 512, 1536, 1.0), ("attention out", 512, 512, 1.0), ("ffn in", 512, 1536, 1.0),
                ("ffn out", 768, 512, 1.0), ("head, masked tokens of one codebook", 512, 1024, 0.6)]


def timed(runs: dict, repeats: int) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in alternating(runs, repeats).items()}


def onednn_product(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def layer_rows(tokens: int, repeats: int, layers=SMALL_LAYERS) -> list[str]:
    lines = ["| layer | rows x in -> out | forward MKL / oneDNN GFLOP/s | input grad MKL / oneDNN | "
             "weight grad MKL / oneDNN | layer fwd+bwd F.linear ms | ours ms | speed-up |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, width_in, width_out, share in layers:
        rows = int(tokens * share)
        x = torch.randn(rows, width_in, requires_grad=True)
        w = (torch.randn(width_out, width_in) / width_in ** 0.5).requires_grad_()
        g = torch.randn(rows, width_out)
        xd, wd = x.detach(), w.detach()

        def layer(fn):
            def run():
                fn(x, w).backward(g)
                x.grad = w.grad = None
            return run

        t = timed({"fwd mkl": lambda: xd @ wd.t(), "fwd onednn": lambda: onednn_product(xd, wd),
                   "dx mkl": lambda: g @ wd, "dx onednn": lambda: onednn_product(g, wd.t()),
                   "dw mkl": lambda: g.t() @ xd, "dw onednn": lambda: onednn_product(g.t(), xd.t()),
                   "F.linear": layer(F.linear), "ours": layer(linear)}, repeats)
        gflops = lambda key: 2 * rows * width_in * width_out / t[key] / 1e9  # noqa: E731
        lines.append(f"| {name} | {rows} x {width_in} -> {width_out} | {gflops('fwd mkl'):.0f} / {gflops('fwd onednn'):.0f} | "
                     f"{gflops('dx mkl'):.0f} / {gflops('dx onednn'):.0f} | {gflops('dw mkl'):.0f} / {gflops('dw onednn'):.0f} | "
                     f"{t['F.linear'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | {t['F.linear'] / t['ours']:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def norm_rows(tokens: int, repeats: int, width: int = 512) -> list[str]:
    x = (torch.randn(tokens, width) * 2).requires_grad_()
    g = torch.randn(tokens, width)
    ours, composite = RMSNorm(width), torch.nn.RMSNorm(width)

    def row(norm):
        def run():
            norm(x).backward(g)
            x.grad = norm.weight.grad = None
        return run

    t = timed({"nn.RMSNorm": row(composite), "ours": row(ours)}, repeats)
    lines = ["| layer, forward + backward | nn.RMSNorm ms | ours ms | speed-up |", "|---|---|---|---|",
             f"| RMSNorm, {tokens} x {width} | {t['nn.RMSNorm'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | "
             f"{t['nn.RMSNorm'] / t['ours']:.2f}x |"]
    print("\n".join(lines), flush=True)
    return lines


def step_rows(size: str, batch: int, frames: int, steps: int, warmup: int) -> list[str]:
    from bench_train import our_step_fn

    sides = {}
    for choice in ("aten", "auto"):  # the same seed: the same weights and batches
        step, index = our_step_fn(size, batch, frames, cpu_matmul=choice)[0], itertools.count()
        sides[choice] = lambda step=step, index=index: step(next(index))
    times = alternating(sides, steps, warmup)
    ratios = [a / b for a, b in zip(times["aten"], times["auto"])]
    lines = ["| size | s/step, cpu_matmul=aten (MKL) | s/step, auto (oneDNN) | speed-up (median of pairs) | range |",
             "|---|---|---|---|---|",
             f"| {size} | {statistics.median(times['aten']):.3f} | {statistics.median(times['auto']):.3f} | "
             f"**{statistics.median(ratios):.2f}x** | {min(ratios):.2f}–{max(ratios):.2f} |"]
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8 * 344)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--step", action="store_true", help="also time whole training steps, aten against auto")
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if not onednn_available():
        raise SystemExit("this torch has no oneDNN linear kernel for this CPU: nothing to compare")
    torch.manual_seed(0)
    print(f"CPU fp32 linear layers, {args.tokens} tokens, median of {args.repeats}, {torch.get_num_threads()} threads\n")
    lines = layer_rows(args.tokens, args.repeats)
    print()
    lines += [""] + norm_rows(args.tokens, args.repeats)
    if args.step:
        print(f"\ntraining steps, batch 8 x 344 frames, median of {args.steps} pairs after {args.warmup}\n")
        lines += [""] + step_rows(args.size, 8, 344, args.steps, args.warmup)
    return lines


if __name__ == "__main__":
    main()
