"""One entry point for the performance benchmarks of issue 11: prints each table and writes bench/results/*.md.

    PYTHONPATH=src python bench/run.py train-gpu                     # one GPU: paper coarse, bf16, 10 s windows
    PYTHONPATH=src python bench/run.py train-gpu --smoke             # any machine: tiny model, checks the code path
    PYTHONPATH=src:/work/orig/lac:/work/orig/deps python bench/run.py train-cpu --original /work/orig/vampnet-ismir \
        --sizes tiny small                                           # CPU step vs the original
    PYTHONPATH=src python bench/run.py generate --device cuda --sizes paper --batches 1 2 4 8 16 --cuda-graphs --bf16
    PYTHONPATH=src:/work/orig/lac:/work/orig/deps python bench/run.py generate --sizes tiny --batches 1 8 \
        --original /work/orig/vampnet-ismir                          # CPU generation vs the original

``generate`` takes the options of ``bench/bench_generate.py`` and writes ``generate.md``.

Each command imports only what it needs (train-gpu: torch + lightning + this project).

train-gpu rows (paper-size coarse model, batch x 861 frames, bf16-mixed): the T5 relative bias
through flex attention and through the materialised-mask SDPA reference, both also with VampNet's
dropout of 0.1 (attention probabilities included), rotary embeddings, with and without activation
checkpointing, and flex attention under FSDP2 on one GPU.
Blocks are compiled (regional compile, the GPU default). MFU counts 6 N + attention FLOPs per
token against 989 TFLOP/s of dense bf16 (H100/H200).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# (label, position, attention backend, activation checkpointing, strategy, dropout)
TRAIN_GPU_ROWS = [
    ("relative bias, flex attention", "relative", "flex", False, "auto", 0.0),
    ("relative bias, flex attention, activation checkpointing", "relative", "flex", True, "auto", 0.0),
    ("relative bias, SDPA + materialised mask (reference)", "relative", "sdpa", False, "auto", 0.0),
    ("relative bias, flex attention, dropout 0.1 (VampNet's, attention included)", "relative", "flex", False, "auto",
     0.1),
    ("relative bias, SDPA + materialised mask, dropout 0.1", "relative", "sdpa", False, "auto", 0.1),
    ("rotary, SDPA (flash)", "rotary", "auto", False, "auto", 0.0),
    ("rotary, SDPA (flash), activation checkpointing", "rotary", "auto", True, "auto", 0.0),
    ("relative bias, flex attention, FSDP2 on one GPU", "relative", "flex", False, "fsdp2", 0.0),
]


def command_line() -> str:
    """The command that made a results file, as its first line."""
    pythonpath = os.environ.get("PYTHONPATH")
    return f"# {'PYTHONPATH=' + pythonpath + ' ' if pythonpath else ''}python {' '.join(sys.argv)}"


def write(out: Path, name: str, header: str, rows: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".md.partial")
    tmp.write_text(command_line() + "\n" + header + "\n" + "\n".join(rows) + "\n")
    tmp.replace(path)
    return path


def train_gpu(args) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_gpu import measure

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("train-gpu needs a CUDA GPU; use --smoke to check the code path on CPU")
    size, batch, frames, steps, warmup = ("tiny", 2, 65, 2, 1) if args.smoke else (
        args.size, args.batch, args.frames, args.steps, args.warmup)
    device = torch.cuda.get_device_name() if cuda else "CPU (smoke: fp32, flex rows fall back to SDPA, no compile)"
    header = (f"device: {device}, torch {torch.__version__}; {size} coarse model, batch {batch} x {frames} frames, "
              f"{steps} timed steps after {warmup}\n\n"
              "| configuration | parameters | compiled | tokens/s | model TFLOP/s | MFU | peak GiB |\n"
              "|---|---|---|---|---|---|---|")
    print(header, flush=True)
    rows = []
    for label, position, backend, checkpointing, strategy, dropout in TRAIN_GPU_ROWS:
        if not cuda and backend == "flex":
            backend = "auto"  # no flex attention backward on CPU (torch 2.11)
        result = measure(size, batch, frames, steps, warmup, position=position, compile=None if cuda else False,
                         attention_backend=backend, activation_checkpointing=checkpointing, strategy=strategy,
                         dropout=dropout)
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        rows.append(f"| {label} | {result['parameters'] / 1e6:.0f} M | {'yes' if result['compiled'] else 'no'} | "
                    f"{result['tokens_per_s']:,.0f} | {result['tflops']:.0f} | {mfu} | {result['peak_gib']:.1f} |")
        print(rows[-1], flush=True)
    path = write(args.out, "train_gpu_smoke.md" if args.smoke else "train_gpu.md", header, rows)
    print(f"\nwritten: {path}")


def train_cpu(args) -> None:
    import platform

    import torch

    sys.path.insert(0, str(HERE))
    from bench_train import compare_with_original

    threads = args.threads or torch.get_num_threads()
    header = (f"training step, ours vs the original VampNet ({args.original or 'not given: our column only'}): "
              f"batch {args.batch} x {args.frames} frames, 4 codebooks, {threads} threads, {args.rounds} rounds of one "
              f"process per side (alternating), each the median of {args.steps} steps after {args.warmup}; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print(header, flush=True)
    rows = compare_with_original(args.original, args.sizes, args.batch, args.frames, args.steps, args.warmup,
                                 args.rounds, args.threads)
    print(f"\nwritten: {write(args.out, 'train_cpu_vs_original.md', header, rows)}")


def generate(args) -> None:
    sys.path.insert(0, str(HERE))
    from bench_generate import main as generate_main

    generate_main([*args.options, "--out", str(args.out / "generate.md")])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result tables (bench/results)")
    commands = parser.add_subparsers(dest="command", required=True)
    gpu = commands.add_parser("train-gpu", help="training throughput and MFU on one GPU")
    gpu.add_argument("--smoke", action="store_true", help="tiny model, a few steps, runs on CPU")
    gpu.add_argument("--size", default="paper")
    gpu.add_argument("--batch", type=int, default=16)
    gpu.add_argument("--frames", type=int, default=861)  # 10 s of DAC 44.1 kHz frames
    gpu.add_argument("--steps", type=int, default=30)
    gpu.add_argument("--warmup", type=int, default=5)
    cpu = commands.add_parser("train-cpu", help="CPU training step vs the original VampNet, side by side")
    cpu.add_argument("--original", help="checkout of the original VampNet (ismir-2023 branch); without it, ours only")
    cpu.add_argument("--rounds", type=int, default=3, help="processes per side, alternating")
    cpu.add_argument("--sizes", nargs="+", default=["small"])
    cpu.add_argument("--batch", type=int, default=8)
    cpu.add_argument("--frames", type=int, default=344)
    cpu.add_argument("--steps", type=int, default=10)
    cpu.add_argument("--warmup", type=int, default=2)
    cpu.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    commands.add_parser("generate", help="generation speed: takes bench/bench_generate.py's options", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "generate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.options = rest
    {"train-gpu": train_gpu, "train-cpu": train_cpu, "generate": generate}[args.command](args)


if __name__ == "__main__":
    main()
