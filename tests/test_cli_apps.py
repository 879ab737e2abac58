"""`vampnet-pl train` and `vampnet-pl eval` take the same Hydra overrides and flags as the `python -m` entry points."""

from __future__ import annotations

import sys

import lightning  # noqa: F401  its loggers' handlers bind sys.stderr at import: here, not inside a test's capture
import pytest

from vampnet_pl.cli import main


def module_entry_point(main_fn, overrides: list[str]) -> None:
    """What `python -m vampnet_pl.training.app ...` does: the Hydra app with those arguments as its command line."""
    saved = sys.argv
    sys.argv = ["app", *overrides]
    try:
        main_fn()
    finally:
        sys.argv = saved


@pytest.mark.parametrize("stage, overrides", [
    ("train", ["model=coarse_small", "masking=span", "masking.span_frames=4", "optim.lr=0.01", "logger=sweep",
               "experiment=demo_coarse", "trainer.max_steps=7"]),
    ("eval", ["coarse=a.pt", "c2f=b.pt", "dataset_dir=/data/codes", "n_windows=4", "prompts=[periodic:8,prefix:1.0]"]),
])
def test_the_command_prints_the_same_config_as_the_module(stage, overrides, capsys):
    from vampnet_pl.evaluation.app import main as eval_main
    from vampnet_pl.training.app import main as train_main

    assert main([stage, "--cfg", "job", *overrides]) == 0
    from_cli = capsys.readouterr().out
    module_entry_point(train_main if stage == "train" else eval_main, ["--cfg", "job", *overrides])
    from_module = capsys.readouterr().out
    assert from_cli == from_module
    assert len(from_cli.splitlines()) > 10
    if stage == "train":
        assert "kind: span" in from_cli and "span_frames: 4" in from_cli and "lr: 0.01" in from_cli
    else:
        assert "n_windows: 4" in from_cli and "- periodic:8" in from_cli


@pytest.mark.parametrize("stage, typo", [("train", "optim.lrr=0.1"), ("eval", "n_windowz=4"),
                                         ("eval", "split=tset"), ("train", "data.batch_size=abc")])
def test_the_command_rejects_a_typo_like_the_module(stage, typo, capsys):
    """What Hydra refuses while merging (README: exit status 1): an unknown key, a name or type a field refuses."""
    with pytest.raises(SystemExit) as err:
        main([stage, "--cfg", "job", "coarse=a.pt", "dataset_dir=d", typo] if stage == "eval" else [stage, typo])
    assert err.value.code == 1
    assert typo.split("=")[0].split(".")[-1] in capsys.readouterr().err


def test_each_job_of_a_multirun_gets_its_own_run_folder(tmp_path, monkeypatch):
    """`train -m` without a run_name: job #1 must not resume job #0's checkpoint nor overwrite its metrics.csv."""
    from types import SimpleNamespace

    from vampnet_pl.training import app

    seen = []

    def fake_run(cfg, **kwargs):  # what the real run reads: run_dir, and the folders the callbacks and logger interpolate
        seen.append((cfg.optim.lr, cfg.run_dir, cfg.callbacks.last_checkpoint.dirpath, cfg.logger.save_dir))
        return SimpleNamespace(received_sigterm=False, callbacks=[])

    monkeypatch.setattr(app, "run", fake_run)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["train", "-m", "optim.lr=0.001,0.0003", f"runs_dir={tmp_path}", "logger=csv"]) == 0
    assert seen == [(lr, f"{tmp_path}/vampnet-local-{n}", f"{tmp_path}/vampnet-local-{n}/checkpoints",
                     f"{tmp_path}/vampnet-local-{n}") for n, lr in enumerate((0.001, 0.0003))]
    seen.clear()
    assert main(["train", f"runs_dir={tmp_path}", "logger=csv"]) == 0  # a single run keeps its plain folder
    assert seen[0][1] == f"{tmp_path}/vampnet-local"


def test_a_lora_key_without_a_lora_config_asks_for_the_group(capsys):
    """`lora.r=4` without `lora=default` ended in Hydra's bare `AssertionError: Unexpected type for root`."""
    from vampnet_pl.config import UsageError, compose

    assert main(["train", "data.dataset_dir=codes", "lora.r=4"]) == 2
    assert "select lora=default first" in capsys.readouterr().err
    with pytest.raises(UsageError, match="select lora=default first"):  # ablate composes here
        compose("train", ["data.dataset_dir=codes", "lora.r=4"])
    for choice in ("lora=default", "experiment=vampnet_lora"):
        assert compose("train", ["data.dataset_dir=codes", "init_from=m.pt", choice, "lora.r=4"]).lora.r == 4


@pytest.mark.parametrize("flag, value, message", [
    ("--variations", "0", "--variations must be at least 1"), ("--loop", "-1", "--loop must be at least 0"),
    ("--window-seconds", "0", "vamp: --window-seconds must be > 0"),
    ("--c2f-chunk-seconds", "0", "vamp: --c2f-chunk-seconds must be > 0"),
    ("--top-p", "1.5", "vamp: sampling --top-p must be in (0, 1] or null, got 1.5")])
def test_vamp_refuses_counts_and_lengths_out_of_range(flag, value, message, tmp_path, capsys):
    """Checked before any model loads (--variations 0 wrote one variation, --window-seconds 0 a frame-count error)."""
    args = ["vamp", str(tmp_path / "in.wav"), "--coarse", str(tmp_path / "c.pt"), "--codec", str(tmp_path / "codec.pth")]
    assert main([*args, flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("stage, args, message", [
    ("train", [], "error: bad configuration for train: data.dataset_dir is not set"),
    ("train", ["data.dataset_dir=codes", "masking.schedule=cosin"], "error: bad configuration for train: unknown masking schedule 'cosin'"),
    ("train", ["data.dataset_dir=codes", "seed=-1"], "error: bad configuration for train: seed must be in [0, 4294967295]"),
    ("train", ["data.dataset_dir=codes", f"seed={2**64}"],
     "error: bad configuration for train: seed must be in [0, 4294967295] (Lightning seeds NumPy with it), got 18446744073709551616"),
    ("train", ["data.dataset_dir=codes", "codec.source=/nonexistent/codec.pth"], "error: codec checkpoint not found"),
    ("eval", ["coarse=c.pt", "dataset_dir=codes", "fad_backend=clapp"], "error: bad configuration for eval: unknown FAD backend"),
    ("eval", ["coarse=/nonexistent/c.pt", "dataset_dir=codes"], "error: model not found"),
    ("train", ["data.dataset_dir=codes", "codec.source={codec}", "model.n_codebooks=20"],
     "error: model reads 20 codebooks, the codec has 14"),
    # Hydra's own advice for a typo (`To append to your config use +data.batchsize=3`): the key was added, and trained on
    ("train", ["data.dataset_dir=codes", "+data.batchsize=3"],
     "error: bad configuration for train: unknown setting data.batchsize (did you mean data.batch_size?)"),
    ("train", ["data.dataset_dir=codes", "+trainer.max_step=3"],
     "error: bad configuration for train: unknown setting trainer.max_step (did you mean trainer.max_steps?)"),
    ("eval", ["coarse=c.pt", "dataset_dir=codes", "+n_windowz=4"],
     "error: bad configuration for eval: unknown setting n_windowz (did you mean n_windows?)")])
def test_a_wrong_setting_or_missing_file_is_one_line_and_exit_2(stage, args, message, tmp_path, capsys, codec_path):
    """The schemas' own checks and missing files ended in Hydra's traceback and exit status 1 (the other commands: 2)."""
    with pytest.raises(SystemExit) as err:
        main([stage, f"{'runs_dir' if stage == 'train' else 'out_dir'}={tmp_path}",
              *[a.format(codec=codec_path) for a in args]])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), stderr
    assert "HYDRA_FULL_ERROR" not in stderr  # Hydra's report of an exception, with its traceback


@pytest.mark.parametrize("args, message", [
    (["init_from={tmp}/nothere.pt"], "error: init_from={tmp}/nothere.pt: no such file (give a model exported with "),
    (["init_from={tmp}/base.pt", "model=c2f_tiny"],
     "error: init_from={tmp}/base.pt was exported from another model than this run's (n_codebooks: 4 in the file, 14 in "
     "this run; n_conditioning_codebooks: 0 in the file, 4 in this run): choose the model preset it was trained with"),
    (["init_from={tmp}/base.pt", "lora=default", "lora.target_modules=[q,v]"],
     "error: lora.target_modules ['q', 'v'] match no layer of this model (qkv=fused"),
    (["init_from={tmp}/base.pt", "lora=default", "lora.target_modules=[qkv,ffn]"],
     "error: lora.target_modules name layers that are not linear: ffn (GEGLU blocks.0.ffn)")])
def test_a_wrong_init_from_or_lora_target_is_one_line_and_exit_2(args, message, prepared, codec, codec_path, tmp_path,
                                                                 capsys):
    """The README's fine-tuning (`init_from=coarse.pt`, `lora=default`) given another model's file, a file that is not
    there, or LoRA targets the model lacks: Hydra's traceback and exit status 1, or a bare `[Errno 2]`."""
    import dataclasses

    from vampnet_pl.config import compose
    from vampnet_pl.model import VampNet, save_exported

    model = compose("train", [f"data.dataset_dir={prepared}"]).model  # coarse_tiny, as the codec completes it
    model = dataclasses.replace(model, codebook_size=codec.codebook_size, latent_dim=codec.table_width(model.embedding),
                                codec_fingerprint=codec.fingerprint)
    save_exported(tmp_path / "base.pt", VampNet(model, codec.codebook_tables(model.embedding)[:model.n_codebooks]))
    with pytest.raises(SystemExit) as err:
        main(["train", f"runs_dir={tmp_path}", f"data.dataset_dir={prepared}", f"codec.source={codec_path}",
              "data.num_workers=0", *[a.format(tmp=tmp_path) for a in args]])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message.format(tmp=tmp_path)), stderr
    assert "HYDRA_FULL_ERROR" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("stage, args, message", [
    ("train", ["trainer=gpu"], "error: trainer.accelerator 'gpu': this machine has no CUDA GPU (use auto or cpu)"),
    ("train", ["trainer.accelerator=cuda"], "error: trainer.accelerator 'cuda': this machine has no CUDA GPU"),
    ("eval", ["codec.device=cuda"], "error: codec.device 'cuda': this machine has no CUDA GPU (use auto or cpu)"),
    ("eval", ["codec.device=cuda:1"], "error: codec.device 'cuda:1': this machine has no CUDA GPU"),
    ("eval", ["codec.device=gpu"], "error: unknown codec.device 'gpu': use auto, cpu, cuda or cuda:N")])
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(stage, args, message, tmp_path, capsys, monkeypatch):
    """A CUDA device on a machine without one ended in Lightning's (train) or torch's (eval) traceback, status 1;
    ``vamp --device`` refused it in one line."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    common = (["data.dataset_dir=codes", f"runs_dir={tmp_path}"] if stage == "train" else
              ["coarse=c.pt", "dataset_dir=codes", f"out_dir={tmp_path}"])  # refused before these are read
    with pytest.raises(SystemExit) as err:
        main([stage, *common, *args])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), stderr
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr

def test_a_process_lightning_starts_for_a_multi_device_train_runs_train(capsys, monkeypatch):
    """Lightning re-runs the program (sys.argv[0], kept by `vampnet-pl train`) with the overrides and its own Hydra
    ones, without the stage: that was an argparse error, and the first rank waited for the others until killed."""
    from vampnet_pl import cli

    seen = []
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vampnet-pl", "train", "x=1"])
    cli._run_hydra_app(lambda: seen.append(list(sys.argv)), ["x=1"])
    assert seen == [["/venv/bin/vampnet-pl", "x=1"]]  # the program itself, not "vampnet-pl train" (no such file)
    child = ["experiment=demo_coarse", 'hydra.run.dir="runs/x/hydra"', "hydra.job.name=train_ddp_process_1",
             "hydra.output_subdir=null", "--cfg", "job"]
    assert main(child) == 0
    assert "experiment: demo_coarse" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # without Lightning's job name an override alone is still no command
        main(["experiment=demo_coarse"])


@pytest.mark.parametrize("error", [FileNotFoundError("/tmp/gone/part-3.bin"), ValueError("unrelated")])
def test_a_missing_file_during_training_keeps_its_traceback(error, prepared, codec_path, tmp_path, capsys, monkeypatch):
    """usage_errors_exit turned any FileNotFoundError raised inside trainer.fit (a callback's file, the data stream
    mid-run: a bug, not the user's setting) into the one-line `error: ...` with exit 2, and lost its traceback."""
    from vampnet_pl.training.module import MaskedTokenModule

    def broken_step(self, batch, batch_idx):
        raise error

    monkeypatch.setattr(MaskedTokenModule, "training_step", broken_step)
    with pytest.raises(SystemExit) as err:
        main(["train", f"data.dataset_dir={prepared}", f"codec.source={codec_path}", "codec.device=cpu",
              f"runs_dir={tmp_path}", "experiment=demo_coarse", "data.num_workers=0", "data.window_seconds=1.0",
              "data.batch_size=2", "data.val_max_windows=2", "trainer.enable_progress_bar=false", "logger=csv",
              "trainer.max_steps=1", "trainer.num_sanity_val_steps=0"])
    assert err.value.code == 1  # Hydra's report of a failure, as for any other exception
    stderr = capsys.readouterr().err
    assert not any(line.startswith("error:") for line in stderr.splitlines()), stderr
    assert "Traceback" in stderr and "broken_step" in stderr and str(error) in stderr, stderr


def test_a_missing_file_while_scoring_keeps_its_traceback(prepared, codec, codec_path, tmp_path, capsys, monkeypatch):
    """As in training: `vampnet-pl eval` reported a FileNotFoundError raised while scoring as a user's mistake."""
    from vampnet_pl.evaluation import app
    from vampnet_pl.model import save_exported
    from test_vamp import small_model

    def broken_scoring(*args, **kwargs):
        raise FileNotFoundError("/tmp/gone/embedding-cache.npy")

    monkeypatch.setattr(app, "evaluate_generation", broken_scoring)
    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    args = ["eval", f"coarse={tmp_path / 'coarse.pt'}", f"codec.source={codec_path}", "codec.device=cpu",
            f"dataset_dir={prepared}", "split=val", "window_seconds=1.0", "n_windows=2", f"out_dir={tmp_path / 'eval'}"]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 1
    stderr = capsys.readouterr().err
    assert not any(line.startswith("error:") for line in stderr.splitlines()), stderr
    assert "Traceback" in stderr and "broken_scoring" in stderr, stderr
    with pytest.raises(SystemExit) as err:  # a missing dataset folder, before scoring: still one line
        main([*args[:-4], f"dataset_dir={tmp_path / 'nowhere'}", *args[-3:]])
    assert err.value.code == 2
    assert "error: no index.json in" in capsys.readouterr().err


@pytest.mark.parametrize("app_module", ["vampnet_pl.training.app", "vampnet_pl.evaluation.app"])
def test_the_apps_pickle_by_value_as_submitit_pickles_them(app_module):
    """Hydra's submitit launcher pickles the task function with cloudpickle; run as ``python -m``, an app is
    ``__main__`` and its functions are pickled by value with every global they reach. ``torch.backends`` (a module
    subclass) cannot be: a check using it in app.py failed every submitit sweep at submission."""
    import importlib

    import cloudpickle

    module = importlib.import_module(app_module)
    cloudpickle.register_pickle_by_value(module)
    try:
        cloudpickle.loads(cloudpickle.dumps(module.main))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
