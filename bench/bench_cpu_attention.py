"""CPU attention with dropout, one layer forward and backward, and dropout alone: ours against torch's.

    PYTHONPATH=src .venv/bin/python bench/bench_cpu_attention.py               # small: batch 8, 8 heads, 344 frames
    PYTHONPATH=src .venv/bin/python bench/bench_cpu_attention.py --frames 861  # 10 s windows

Rows, each the median of ``--repeats`` calls, all rows alternating in one process:
- ``sdpa``: ``F.scaled_dot_product_attention`` with ``dropout_p`` (torch's CPU dropout, ``bernoulli_``);
- ``autograd``: SDPA's math composed of autograd ops, with our mask as a bool product (this project's
  attention before it became one autograd function);
- ``ours``: :func:`vampnet_pl.model.attention.attention_with_dropout`;
- ``F.dropout`` and ``ours: dropout`` on a ``[batch, frames, 2 x width]`` activation, forward and backward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vampnet_pl.model.attention import attention_with_dropout
from vampnet_pl.model.dropout import dropout, keep_mask


def alternating(runs: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls per run, the runs alternating (this machine's speed drifts over
    minutes, so alternation keeps their ratios fair), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def composed_attention(q, k, v, mask, p):
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    probs = (scores + mask).softmax(-1)
    return (probs * keep_mask(probs.shape, p) @ v) * (1.0 / (1.0 - p))


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--frames", type=int, default=344)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.frames, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, args.heads, args.frames, args.frames, requires_grad=True)
    activation = torch.randn(args.batch, args.frames, 2 * args.heads * args.head_dim, requires_grad=True)

    def attention_row(fn):
        def run():
            out = fn(q, k, v, mask, args.p)
            out.backward(torch.ones_like(out))
        return run

    def dropout_row(fn):
        def run():
            out = fn(activation, args.p)
            out.backward(torch.ones_like(out))
        return run

    rows = {"sdpa": attention_row(lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3], dropout_p=a[4])),
            "autograd": attention_row(composed_attention),
            "ours": attention_row(attention_with_dropout),
            "F.dropout": dropout_row(lambda x, p: F.dropout(x, p)),
            "ours: dropout": dropout_row(dropout)}
    times = alternating(rows, args.repeats)
    lines = [f"CPU attention with dropout p={args.p}, q/k/v {list(shape)}, forward + backward; dropout on "
             f"{list(activation.shape)}; median of {args.repeats}, {torch.get_num_threads()} threads", "",
             "| path | ms |", "|---|---|"]
    lines += [f"| {name} | {statistics.median(t) * 1e3:.1f} |" for name, t in times.items()]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
