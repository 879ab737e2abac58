"""The ``vampnet-pl`` command. Flags pick what to run; settings are Hydra overrides (``key=value``).

    vampnet-pl demo                                   # the offline main job
    vampnet-pl train data.dataset_dir=DIR model=coarse_small   # Hydra training app (conf/train.yaml)
    vampnet-pl eval coarse=coarse.pt c2f=c2f.pt dataset_dir=DIR   # offline evaluation (conf/eval.yaml)
    vampnet-pl prep all catalog=DIR out_dir=DIR       # scan + encode + finalize
    vampnet-pl prep encode --task-index 3 --num-tasks 8 out_dir=DIR ...   # one share (SLURM array task)
    vampnet-pl prep verify [--deep] out_dir=DIR       # --deep: decode and check every sample
    vampnet-pl prep finalize --verify catalog=DIR out_dir=DIR   # write index.json, then verify (SLURM finalize job)
    vampnet-pl prep repair out_dir=DIR                # re-encode only the units whose shards fail
    vampnet-pl codec synthetic artifacts/synthetic_dac.pth
    vampnet-pl ablate run conf/ablation/demo.yaml [--parallel 2] [--launcher slurm] [extra base overrides]
    vampnet-pl ablate report sweeps/demo [--baseline CONDITION] [--metric val/loss]
    vampnet-pl catalog synthetic DIR --files 24 --seconds 20
    vampnet-pl import-vampnet --codec codec.pth --coarse coarse.pth --c2f c2f.pth --out-dir models/vampnet
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from vampnet_pl.config import UsageError, check_prompt_presets, compose  # noqa: F401 (re-exported for callers)

log = logging.getLogger("vampnet_pl")


def slurm_array_task() -> tuple[int, int] | None:
    """(task index, task count) of a SLURM array task, counted from 0, or None. The array must be a range
    (``--array=0-7``, as ``slurm/prep.sh`` submits): in a sparse one (``--array=3,5``, a hand-made retry) the
    task ids do not say which shares the tasks stand for."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return None
    env = {key: int(os.environ[f"SLURM_ARRAY_TASK_{key}"]) for key in ("ID", "MIN", "MAX", "COUNT")
           if f"SLURM_ARRAY_TASK_{key}" in os.environ}
    first, count = env.get("MIN", 0), env["COUNT"]
    if env.get("MAX", first + count - 1) - first + 1 != count:
        raise UsageError(f"SLURM array task {env['ID']} belongs to a sparse array ({count} tasks from {first} to "
                         f"{env.get('MAX')}): give --task-index and --num-tasks, or run slurm/prep.sh again "
                         "(finished units are skipped)")
    return env["ID"] - first, count


def _cmd_prep(args: argparse.Namespace) -> int:
    from vampnet_pl.prep import index as prep_index
    from vampnet_pl.prep import run

    if args.stage == "verify":
        if len(args.overrides) != 1 or not args.overrides[0].startswith("out_dir="):
            raise UsageError("usage: vampnet-pl prep verify [--deep] out_dir=DIR")
        return _verify(prep_index, _parse_out_dir(args.overrides[0]), args.deep)
    if args.stage == "repair":
        cfg = _saved_prep_config(args.overrides)
        redone = prep_index.repair(cfg, deep=True)
        print(f"repair: re-encoded {len(redone)} unit(s): {', '.join(redone)}" if redone else "repair: nothing to do")
        problems = prep_index.verify(cfg.out_dir, deep=True)
        for problem in problems:
            print(f"PROBLEM {problem}")
        return 0 if not problems else 1
    cfg = compose("prep", args.overrides)
    if args.stage == "scan":
        entries, failures = run.scan(cfg)
        print(f"scan: {len(entries)} files in manifest, {len(failures)} failures")
    elif args.stage == "encode":
        task = (args.task_index, args.num_tasks) if args.task_index is not None else slurm_array_task() or (0, 1)
        run.encode_local(cfg, *task)
    elif args.stage == "finalize":
        run.print_summary(prep_index.finalize(cfg, run.load_codec(cfg)))
        if args.verify:  # the out_dir of this composed config (quoted, interpolated: as the stages read it)
            return _verify(prep_index, cfg.out_dir, args.deep)
    else:
        run.run_all(cfg)
    return 0


def _verify(prep_index, out_dir: str, deep: bool) -> int:
    problems = prep_index.verify(out_dir, deep=deep)
    for problem in problems:
        print(f"PROBLEM {problem}")
    print("verify: OK" if not problems else f"verify: {len(problems)} problem(s)")
    return 0 if not problems else 1


def _parse_out_dir(override: str) -> str:
    """The folder of an ``out_dir=...`` override, read as Hydra and OmegaConf read it in the other stages:
    ``out_dir='/data/codes,v2'`` (quoted), ``out_dir=${oc.env:SCRATCH}/codes`` (resolved)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OverridesParser.create().parse_override(override).value()
        return str(OmegaConf.create({"out_dir": value}).out_dir)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(f"bad out_dir: {err}") from None


def _saved_prep_config(overrides: list[str]):
    """The config ``prep`` saved in ``out_dir`` (so ``repair out_dir=DIR`` rebuilds with the same settings)."""
    from omegaconf import OmegaConf

    from vampnet_pl.config import PrepConfig

    out_dir = next((_parse_out_dir(o) for o in overrides if o.startswith("out_dir=")), None)  # as verify reads it
    if out_dir is None:
        raise UsageError("usage: vampnet-pl prep repair out_dir=DIR [overrides, e.g. codec.device=cuda]")
    saved = Path(out_dir) / "prep_config.yaml"
    if not saved.is_file():
        raise UsageError(f"no prep_config.yaml in {out_dir}: not a prep output folder")
    from omegaconf.errors import OmegaConfBaseException

    try:  # an override typo is a usage error (one line, exit 2), as in the other stages
        # out_dir as parsed above (Hydra's grammar: an escaped `\,` too), not as the dotlist would read it
        others = [o for o in overrides if not o.startswith("out_dir=")]
        merged = OmegaConf.merge(OmegaConf.structured(PrepConfig), OmegaConf.load(saved),
                                 OmegaConf.from_dotlist(others), {"out_dir": out_dir})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UsageError(f"bad configuration for prep repair: {err}") from None


def _cmd_codec(args: argparse.Namespace) -> int:
    from vampnet_pl.codec import Codec, SyntheticCodecSpec, make_synthetic_codec

    path = make_synthetic_codec(args.path, SyntheticCodecSpec(n_codebooks=args.n_codebooks, seed=args.seed))
    codec = Codec.load(str(path), device="cpu")
    print(f"wrote {path}: {codec.n_codebooks} codebooks, hop {codec.hop_length}, fingerprint {codec.fingerprint[:16]}")
    return 0


def _cmd_catalog(args: argparse.Namespace) -> int:
    from vampnet_pl.synth import write_catalog

    files = write_catalog(args.out_dir, n_files=args.files, seconds=args.seconds, seed=args.seed)
    print(f"{len(files)} files in {args.out_dir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vampnet_pl.training.export import export_checkpoint
    from vampnet_pl.model import load_exported

    out = export_checkpoint(args.checkpoint, args.out)
    model = load_exported(out)
    print(f"wrote {out}: {model.num_parameters():,} parameters, codec {model.cfg.codec_fingerprint[:16]}")
    return 0


def generation_config(args: argparse.Namespace):
    """``vamp``'s sampling settings from its flags (both stages share the original app's settings)."""
    from vampnet_pl.generation.pipeline import GenerationConfig
    from vampnet_pl.generation.sampling import SamplingConfig

    shared = dict(temperature=args.temperature, sample_cutoff=args.sample_cutoff, seed=args.seed,
                  cuda_graphs=args.cuda_graphs)  # both stages, as the original's app
    coarse_mask_temperature = 10.5 if args.mask_temperature is None else args.mask_temperature
    c2f_mask_temperature = 1.0 if args.mask_temperature is None else args.mask_temperature
    return GenerationConfig(coarse=SamplingConfig(passes=args.coarse_passes, top_k=args.top_k, top_p=args.top_p,
                                                  typical_p=args.typical_p, typical_min_tokens=args.typical_min_tokens,
                                                  mask_temperature=coarse_mask_temperature, **shared),
                            c2f=SamplingConfig(passes=args.c2f_passes, mask_temperature=c2f_mask_temperature, **shared),
                            window_seconds=args.window_seconds, overlap_seconds=args.overlap_seconds,
                            c2f_chunk_seconds=args.c2f_chunk_seconds)


def _cmd_vamp(args: argparse.Namespace) -> int:
    from vampnet_pl.audio_io import AudioReadError
    from vampnet_pl.generation.vamp import load_pipeline, vamp_file

    for flag, value, lowest in (("--variations", args.variations, 1), ("--loop", args.loop, 0),
                                ("--coarse-passes", args.coarse_passes, 1), ("--c2f-passes", args.c2f_passes, 1)):
        if value < lowest:
            raise UsageError(f"{flag} must be at least {lowest}, got {value}")
    try:
        cfg = generation_config(args)
    except ValueError as err:  # a setting out of range (the configs' own checks), named by its flag
        message = str(err)
        for name in vars(args):
            message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
        raise UsageError(f"vamp: {message}") from None
    check_prompt_presets(args.prompt, "--prompt")  # needs no audio: before the models load and the input is encoded
    pipeline = load_pipeline(args.coarse, args.c2f, args.codec, args.device, cfg)
    check_prompt_presets(args.prompt, "--prompt", pipeline.n_codebooks)  # compression:N:P: before the input is read
    try:
        written = vamp_file(pipeline, args.input, args.out_dir, args.prompt, args.variations, args.loop, args.seed,
                            random_roll=args.random_roll, loudness_match=args.match_loudness, overwrite=args.overwrite)
    except AudioReadError as err:
        raise UsageError(f"cannot read {args.input}: {err}") from None
    except FileExistsError as err:
        raise UsageError(f"{err} (--overwrite)") from None
    for path in written:
        print(path)
    return 0


def _cmd_import_vampnet(args: argparse.Namespace) -> int:
    from vampnet_pl.model import load_exported
    from vampnet_pl.model.import_vampnet import import_vampnet

    written = import_vampnet(args.out_dir, args.codec, args.coarse, args.c2f, args.coarse_lora, args.c2f_lora,
                             trust_pickle=args.trust_pickle)
    for name, path in written.items():
        detail = "converted LAC codec" if name == "codec" else f"{load_exported(path).num_parameters():,} parameters"
        print(f"wrote {path}: {detail}")
    return 0


def _run_hydra_app(main_fn, overrides: list[str]) -> int:
    """Run a ``@hydra.main`` app with the overrides (and Hydra flags such as ``-m``) as its command line. Its program
    stays this one (the ``vampnet-pl`` script, or ``-m vampnet_pl.cli``): Lightning starts the other processes of a
    multi-device run as that program with the overrides, which :func:`main` sends back to ``train``."""
    saved = sys.argv
    sys.argv = [saved[0], *overrides]
    try:
        main_fn()
    finally:
        sys.argv = saved
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vampnet_pl.config import require_lora_group
    from vampnet_pl.training.app import main as train_main

    require_lora_group(args.overrides)
    return _run_hydra_app(train_main, args.overrides)


def _cmd_eval(args: argparse.Namespace) -> int:
    from vampnet_pl.evaluation.app import main as eval_main

    return _run_hydra_app(eval_main, args.overrides)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from vampnet_pl.ablation import report, runner
    from vampnet_pl.ablation.spec import load_spec

    if args.action == "report":
        if args.overrides:
            raise UsageError(f"ablate report takes no overrides: {args.overrides}")
        path = report.write_report(args.target, args.baseline, args.metric)
        print(f"wrote {path}")
        return 0
    if args.parallel is not None and args.parallel < 1:  # 0 fell back to the spec's value, -1 failed after validation
        raise UsageError(f"--parallel must be at least 1, got {args.parallel}")
    spec = load_spec(args.target, args.overrides)
    if args.dry_run:
        sweep, earlier = runner.check(spec, args.sweep_dir)  # what `ablate run` refuses, the dry run refuses too
        # not trained by this command: finished ("skipped"), diverged, or trained by an earlier run's SLURM job
        kept = {o.run: {"skipped": "finished"}.get(o.status, o.status)
                for o in runner.settled_runs(sweep, earlier, args.retry_diverged)}
        kept.update((run, "running") for run in earlier)
        for run in sweep.runs:
            state = f" ({kept[run]}: skipped)" if run in kept else ""
            print(f"{run.run_id}{state}: vampnet-pl train {' '.join(run.overrides)}")
        states = list(kept.values())
        counts = ", ".join(f"{states.count(state)} {state}" for state in ("finished", "diverged", "running"))
        print(f"spec OK: {len(sweep.runs)} runs ({counts}) in {sweep.sweep_dir}")
        return 0
    try:
        outcomes = runner.run_sweep(spec, args.sweep_dir, args.launcher, args.parallel, wait=not args.no_wait,
                                    retry_diverged=args.retry_diverged)
    except runner.SweepStopped as stopped:
        print(f"ablate run {stopped}: its training processes were stopped; the same command resumes the sweep",
              file=sys.stderr)
        return 128 + stopped.signum
    for outcome in outcomes:
        print(f"{outcome.status:9s} {outcome.run.run_id} {outcome.detail}")
    # not finished by this command; a diverged run is a result (its setting's), not a failure of the sweep
    failed = [o for o in outcomes if o.status in ("failed", "running")]
    if outcomes and not args.no_wait:
        print(f"report: vampnet-pl ablate report {outcomes[0].run.run_dir.parents[1]}")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vampnet_pl.demo import run_demo

    run_demo(args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vampnet-pl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prep", help="audio catalog -> DAC codes -> WebDataset shards")
    prep.add_argument("stage", choices=["scan", "encode", "finalize", "verify", "repair", "all"])
    prep.add_argument("--deep", action="store_true", help="verify: decode every sample (ranges, per-sample checksums)")
    prep.add_argument("--verify", action="store_true", help="finalize: then verify the shard set (as prep verify)")
    prep.add_argument("--task-index", type=int, default=None, help="this task's share (default: SLURM array task, else 0)")
    prep.add_argument("--num-tasks", type=int, default=1)
    prep.add_argument("overrides", nargs="*", help="Hydra overrides for conf/prep.yaml")
    prep.set_defaults(func=_cmd_prep)

    codec = commands.add_parser("codec", help="build a small seeded random DAC checkpoint (offline stand-in)")
    codec.add_argument("kind", choices=["synthetic"])
    codec.add_argument("path", type=Path)
    codec.add_argument("--n-codebooks", type=int, default=14)
    codec.add_argument("--seed", type=int, default=0)
    codec.set_defaults(func=_cmd_codec)

    catalog = commands.add_parser("catalog", help="write a deterministic synthetic music catalog")
    catalog.add_argument("kind", choices=["synthetic"])
    catalog.add_argument("out_dir", type=Path)
    catalog.add_argument("--files", type=int, default=24)
    catalog.add_argument("--seconds", type=float, default=20.0)
    catalog.add_argument("--seed", type=int, default=0)
    catalog.set_defaults(func=_cmd_catalog)

    export = commands.add_parser("export", help="training checkpoint (file or sharded folder) -> one portable model file")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.set_defaults(func=_cmd_export)

    vamp = commands.add_parser("vamp", help="variations of an audio file with exported coarse + c2f models")
    vamp.add_argument("input", type=Path)
    vamp.add_argument("--coarse", type=Path, required=True, help="exported coarse model (.pt)")
    vamp.add_argument("--c2f", type=Path, default=None, help="exported coarse-to-fine model (.pt)")
    vamp.add_argument("--codec", required=True, help="the models' DAC: a checkpoint path or 44khz/24khz/16khz")
    vamp.add_argument("--prompt", action="append", default=[], help="periodic:P[:W], prefix:S, suffix:S, inpaint:S1:S2, "
                      "compression:N:P, random:R, beat[:W[:B]], onset[:W[:B]] (repeat to combine)")
    vamp.add_argument("--variations", type=int, default=1)
    vamp.add_argument("--loop", type=int, default=0, help="write one file: the input, then N vamps of it")
    vamp.add_argument("--out-dir", type=Path, default=Path("vamps"))
    vamp.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run (kept by default)")
    vamp.add_argument("--coarse-passes", type=int, default=24)
    vamp.add_argument("--c2f-passes", type=int, default=12)
    vamp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, both stages (<= 0: greedy)")
    vamp.add_argument("--mask-temperature", type=float, default=None,
                      help="Gumbel noise on the re-masking confidences, both stages (default: coarse 10.5, c2f 1.0)")
    vamp.add_argument("--sample-cutoff", type=float, default=1.0,
                      help="sample tokens on passes up to this fraction of the passes, argmax after (both stages)")
    vamp.add_argument("--top-k", type=int, default=None, help="coarse: sample from the k likeliest tokens")
    vamp.add_argument("--top-p", type=float, default=None, help="coarse: nucleus sampling mass")
    vamp.add_argument("--typical-p", type=float, default=None, help="coarse: locally typical sampling mass")
    vamp.add_argument("--typical-min-tokens", type=int, default=1, help="coarse: typical filtering keeps at least this many")
    vamp.add_argument("--random-roll", action="store_true", help="periodic prompts start at a random phase per variation")
    vamp.add_argument("--match-loudness", action=argparse.BooleanOptionalAction, default=True,
                      help="scale each output to the input's loudness (ITU-R BS.1770)")
    vamp.add_argument("--window-seconds", type=float, default=10.0, help="the coarse model's window")
    vamp.add_argument("--overlap-seconds", type=float, default=None,
                      help="each coarse window's context from the one before (default: 2 s, at most half the window)")
    vamp.add_argument("--c2f-chunk-seconds", type=float, default=3.0, help="the c2f model's chunk")
    vamp.add_argument("--cuda-graphs", action="store_true", help="replay each model pass as a CUDA graph (CUDA only)")
    vamp.add_argument("--seed", type=int, default=0)
    vamp.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    vamp.set_defaults(func=_cmd_vamp)

    imp = commands.add_parser("import-vampnet", help="the original VampNet's checkpoints (coarse, c2f, LoRA, LAC codec) "
                              "-> exported models + a codec file Codec.load reads")
    imp.add_argument("--codec", required=True, help="the models' codec: LAC codec.pth (converted), or a DAC checkpoint")
    imp.add_argument("--coarse", type=Path, default=None, help="original coarse.pth")
    imp.add_argument("--c2f", type=Path, default=None, help="original c2f.pth")
    imp.add_argument("--coarse-lora", type=Path, default=None, help="original LoRA fine-tune of the coarse model (lora.pth)")
    imp.add_argument("--c2f-lora", type=Path, default=None, help="original LoRA fine-tune of the c2f model (lora.pth)")
    imp.add_argument("--out-dir", type=Path, required=True, help="writes codec.pth, coarse.pt, c2f.pt here")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow full unpickling of checkpoints whose metadata a weights-only load refuses, and "
                     "loading a LAC codec saved as a torch.package (runs code from the file: only for files you trust)")
    imp.set_defaults(func=_cmd_import_vampnet)

    train = commands.add_parser("train", help="train a coarse or c2f model (Hydra overrides for conf/train.yaml)",
                                add_help=False)
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides and flags (-m, --cfg job, ...)")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="score exported models on a shard split (conf/eval.yaml)", add_help=False)
    evaluate.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides and flags")
    evaluate.set_defaults(func=_cmd_eval)

    ablate = commands.add_parser("ablate", help="ablation sweeps: run a spec's grid x seeds, report means and CIs")
    ablate.add_argument("action", choices=["run", "report"])
    ablate.add_argument("target", type=Path, help="run: the spec YAML; report: the sweep folder")
    ablate.add_argument("--sweep-dir", type=Path, default=None, help="run: where the runs go (default: the spec's)")
    ablate.add_argument("--launcher", choices=["local", "slurm"], default=None, help="run: default: the spec's")
    ablate.add_argument("--parallel", type=int, default=None, help="run: local runs at a time (default: the spec's)")
    ablate.add_argument("--no-wait", action="store_true", help="run, slurm: submit and return")
    ablate.add_argument("--dry-run", action="store_true", help="run: validate the spec and list the runs")
    ablate.add_argument("--retry-diverged", action="store_true",
                        help="run: resume runs that stopped on a NaN/inf loss (default: kept as diverged)")
    ablate.add_argument("--baseline", default=None, help="report: the condition to compare with (default: the spec's)")
    ablate.add_argument("--metric", default=None, help="report: the metric that ranks conditions (default: the spec's)")
    ablate.add_argument("overrides", nargs="*", help="run: extra base overrides for every run")
    ablate.set_defaults(func=_cmd_ablate)

    demo = commands.add_parser("demo", help="the offline main job, end to end")
    demo.add_argument("overrides", nargs="*", help="Hydra overrides for conf/demo.yaml")
    demo.set_defaults(func=_cmd_demo)
    return parser


# what Lightning's launcher adds to the command line of each process it starts for a multi-device Hydra run
LIGHTNING_CHILD = "hydra.job.name=train_ddp_process_"


def relaunched_train(argv: list[str]) -> bool:
    """A process Lightning started for ``vampnet-pl train trainer.devices=N``: the program again, without the stage."""
    return bool(argv) and argv[0] not in ("train", "eval") and any(a.startswith(LIGHTNING_CHILD) for a in argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if relaunched_train(argv):
        argv = ["train", *argv]
    if argv and argv[0] in ("train", "eval"):  # Hydra apps: everything after the stage is theirs
        args = argparse.Namespace(func=_cmd_train if argv[0] == "train" else _cmd_eval, overrides=list(argv[1:]))
        try:
            return args.func(args)
        except UsageError as err:  # found before Hydra runs (Hydra reports its own errors)
            print(f"error: {err}", file=sys.stderr)
            return 2
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]  # Hydra overrides given after the flags
    if getattr(args, "task_index", None) is not None and not 0 <= args.task_index < args.num_tasks:
        print(f"error: --task-index {args.task_index} is outside 0..{args.num_tasks - 1}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from vampnet_pl.prep.index import NothingUsable

        if isinstance(err, NothingUsable):
            print(f"error: {err}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
