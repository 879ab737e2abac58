"""Parity with the original VampNet: its checkpoints imported give its logits and its codec's codes.

The fixture (tests/fixtures/vampnet_original, made by scripts/make_vampnet_fixture.py running the
original ismir-2023 code and LAC) holds small random original models in the original's format
and what the original computed with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from vampnet_pl.cli import main as cli_main
from vampnet_pl.codec import Codec, SyntheticCodecSpec, make_synthetic_codec
from vampnet_pl.model import load_exported
from vampnet_pl.model.import_vampnet import ImportError_, convert_state, import_vampnet, read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "vampnet_original"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def record():
    return torch.load(FIXTURE / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    assert cli_main(["import-vampnet", "--codec", str(FIXTURE / "codec.pth"), "--coarse", str(FIXTURE / "coarse.pth"),
                     "--c2f", str(FIXTURE / "c2f.pth"), "--out-dir", str(out)]) == 0
    return out


def our_logits_in_their_layout(model, codes, mask):
    """Our ``[B, P, T, V]`` logits in the original's ``[B, V, T * P]`` layout (time-major, codebook-minor)."""
    with torch.no_grad():
        logits = model.eval()(codes.long(), mask)
    b, p, t, v = logits.shape
    return logits.permute(0, 3, 2, 1).reshape(b, v, t * p)


@pytest.mark.parametrize("name", ["coarse", "c2f"])
def test_imported_logits_match_the_original(imported, record, name):
    model = load_exported(imported / f"{name}.pt")
    assert model.cfg.embedding == "raw" and model.cfg.qkv == "separate" and model.cfg.ffn == "paper"
    codes = record["codes"][:, : model.cfg.n_codebooks]
    ours = our_logits_in_their_layout(model, codes, record[f"{name}_mask"])
    assert ours.shape == record[f"{name}_logits"].shape
    diff = (ours - record[f"{name}_logits"]).abs().max().item()
    assert diff <= TOLERANCE, f"{name}: max abs logit difference {diff:.2e}"


def test_the_lora_fixture_is_saved_as_the_originals_fine_tuning_saves_it():
    """Both branches fine-tune a torch.compile'd model and save ``lora_state_dict`` of it: every key is prefixed."""
    lora = torch.load(FIXTURE / "coarse_lora.pth", weights_only=True)
    assert lora and all(k.startswith("_orig_mod.transformer.layers.") for k in lora)


def test_imported_lora_fine_tune_matches_the_original(tmp_path, record):
    assert cli_main(["import-vampnet", "--codec", str(FIXTURE / "codec.pth"), "--coarse", str(FIXTURE / "coarse.pth"),
                     "--coarse-lora", str(FIXTURE / "coarse_lora.pth"), "--out-dir", str(tmp_path)]) == 0
    model = load_exported(tmp_path / "coarse.pt")
    ours = our_logits_in_their_layout(model, record["codes"][:, :4], record["coarse_lora_mask"])
    assert (ours - record["coarse_lora_logits"]).abs().max().item() <= TOLERANCE
    base = our_logits_in_their_layout(load_exported(tmp_path / "coarse.pt"), record["codes"][:, :4], record["coarse_mask"])
    assert not torch.allclose(base, record["coarse_logits"], atol=1e-2)  # the adapters did change the model


def test_a_main_branch_checkpoint_imports_with_the_original_logits(tmp_path, record):
    """The main branch's VampNet saves three more constructor arguments, and its training loop saves after
    validation, in eval mode: the weights hold loralib's merged ``B A / 8`` and the adapters are saved too."""
    kwargs, _ = read_checkpoint(FIXTURE / "coarse_main.pth")
    assert {"ctrl_dims", "cfg_dropout_prob", "cond_dim"} <= set(kwargs)
    assert cli_main(["import-vampnet", "--codec", str(FIXTURE / "codec.pth"), "--coarse", str(FIXTURE / "coarse_main.pth"),
                     "--out-dir", str(tmp_path)]) == 0
    main = torch.load(FIXTURE / "main_io.pt", weights_only=True)
    ours = our_logits_in_their_layout(load_exported(tmp_path / "coarse.pt"), record["codes"][:, :4], main["coarse_main_mask"])
    assert (ours - main["coarse_main_logits"]).abs().max().item() <= TOLERANCE


def test_a_main_branch_checkpoint_with_control_encoders_is_refused():
    kwargs, state = read_checkpoint(FIXTURE / "coarse_main.pth")
    kwargs["ctrl_dims"] = {"rms": 1}
    state.update({"ctrl_encoder.ctrl_encoders.rms.weight": torch.zeros(32, 1),
                  "ctrl_encoder.ctrl_encoders.rms.bias": torch.zeros(32)})
    with pytest.raises(ImportError_, match=r"ctrl_dims=\{'rms': 1\}: the main branch's control encoders"):
        convert_state(kwargs, state)


def test_converted_lac_codes_and_audio_match_the_original(imported, record):
    codec = Codec.load(str(imported / "codec.pth"), device="cpu")
    assert (codec.n_codebooks, codec.codebook_size, codec.sample_rate) == (6, 64, record["sample_rate"])
    codes = codec.encode(record["audio"][0, 0], record["sample_rate"])
    assert torch.equal(codes.long(), record["codes"][0])
    audio = codec.decode(record["codes"][0])
    assert (audio - record["decoded"][0, 0]).abs().max().item() <= 1e-5
    assert load_exported(imported / "c2f.pt").cfg.codec_fingerprint == codec.fingerprint
    assert torch.equal(load_exported(imported / "coarse.pt").embedding.codebook_tables,
                       codec.codebook_tables("raw")[:4])


def _save_lac_package(path: Path) -> Path:
    """LAC as audiotools' ``BaseModel.save(path)`` writes it by default (LAC's training writes one as package.pth;
    LAC.load tries it first): a torch.package with the module under ``LAC/LAC.pth``, its metadata beside it. The
    module is this project's LAC (same state dict as the original's), so that no original code enters the fixtures."""
    from torch.package import PackageExporter

    from vampnet_pl.lac_codec import lac_from_state

    kwargs, state = read_checkpoint(FIXTURE / "codec.pth")
    model = lac_from_state(kwargs, state)
    with PackageExporter(str(path)) as exporter:
        exporter.intern("vampnet_pl.lac_codec")
        exporter.extern(["dac.**", "numpy.**", "vampnet_pl.utils.**"])
        exporter.save_pickle("LAC", "LAC.pth", model)
        exporter.save_pickle("LAC", "LAC.metadata", {"kwargs": kwargs})
    return path


def test_a_lac_saved_as_a_package_converts_with_trust_pickle(tmp_path, record, capsys):
    path = _save_lac_package(tmp_path / "codec.pth")
    command = ["import-vampnet", "--codec", str(path), "--coarse", str(FIXTURE / "coarse.pth"), "--out-dir", str(tmp_path / "out")]
    assert cli_main(command) == 2
    assert "a torch.package of LAC" in capsys.readouterr().err and not (tmp_path / "out" / "codec.pth").exists()
    with pytest.raises(ValueError, match="torch.package of VampNet's LAC codec: convert it first .*--trust-pickle"):
        Codec.load(str(path), device="cpu")  # e.g. `vamp --codec`
    assert cli_main([*command, "--trust-pickle"]) == 0
    codec = Codec.load(str(tmp_path / "out" / "codec.pth"), device="cpu")
    assert torch.equal(codec.encode(record["audio"][0, 0], record["sample_rate"]).long(), record["codes"][0])


def test_unconverted_lac_is_refused_with_a_pointer_to_the_import():
    with pytest.raises(ValueError, match="import-vampnet"):
        Codec.load(str(FIXTURE / "codec.pth"), device="cpu")


def test_imported_models_fine_tune_with_init_from_and_lora(imported, record):
    from vampnet_pl.training.module import MaskedTokenModule

    source = load_exported(imported / "coarse.pt").eval()
    tables = source.embedding.codebook_tables
    codes, mask = record["codes"][:, :4].long(), record["coarse_mask"]
    full = MaskedTokenModule(source.cfg, init_from=str(imported / "coarse.pt"), codebook_tables=tables)
    assert torch.equal(full.model.eval()(codes, mask), source(codes, mask))
    lora = {"r": 8, "alpha": 1, "dropout": 0.0, "target_modules": ["q", "v", "out", "ffn_in", "ffn_out"]}
    adapted = MaskedTokenModule(source.cfg, init_from=str(imported / "coarse.pt"), lora=lora, codebook_tables=tables)
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".k.lora_" in n for n in trainable)  # the original adapts q, v, out and the feed-forward, not k
    loss = adapted.model.train()(codes, mask).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in adapted.model.named_parameters() if p.requires_grad)


# -- errors ---------------------------------------------------------------------------------------


def _save_original(path, kwargs, state, **metadata):
    torch.save({"state_dict": state, "metadata": {"kwargs": kwargs, **metadata}}, path)
    return path


def test_a_wrong_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ImportError_, match="not a torch checkpoint"):
        read_checkpoint(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ImportError_, match="not an audiotools BaseModel checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ImportError_, match="no such file"):
        read_checkpoint(tmp_path / "absent.pth")
    kwargs, _ = read_checkpoint(FIXTURE / "coarse.pth")
    _save_original(tmp_path / "lac_as_model.pth", kwargs, read_checkpoint(FIXTURE / "codec.pth")[1])
    with pytest.raises(ImportError_, match="missing keys"):
        convert_state(*read_checkpoint(tmp_path / "lac_as_model.pth"))


def test_pickled_metadata_needs_trust(tmp_path):
    kwargs, state = read_checkpoint(FIXTURE / "coarse.pth")
    path = _save_original(tmp_path / "odd.pth", kwargs, state, args=argparse.Namespace(lr=1.0))
    with pytest.raises(ImportError_, match="--trust-pickle"):
        read_checkpoint(path)
    assert read_checkpoint(path, trust_pickle=True)[0] == kwargs


def test_a_lac_codec_with_pickled_metadata_points_to_trust_pickle(tmp_path, capsys):
    kwargs, state = read_checkpoint(FIXTURE / "codec.pth")
    path = _save_original(tmp_path / "codec.pth", kwargs, state, args=argparse.Namespace(lr=1.0))
    command = ["import-vampnet", "--codec", str(path), "--out-dir", str(tmp_path / "out")]
    assert cli_main(command) == 2
    assert "pass --trust-pickle" in capsys.readouterr().err
    with pytest.raises(ValueError, match="convert it first with `vampnet-pl import-vampnet .*--trust-pickle`"):
        Codec.load(str(path), device="cpu")  # e.g. `vamp --codec`
    assert cli_main([*command, "--trust-pickle"]) == 0
    assert Codec.load(str(tmp_path / "out" / "codec.pth"), device="cpu").n_codebooks == kwargs["n_codebooks"]


@pytest.mark.parametrize("change, message", [
    ("drop", "missing keys .*w_ks"), ("add", "extra keys .*surprise"), ("shape", "has shape"),
    ("kwargs", "unknown constructor arguments"), ("half_lora", "only one of lora_A / lora_B")])
def test_keys_and_shapes_that_do_not_fit_are_refused(change, message):
    kwargs, state = read_checkpoint(FIXTURE / "coarse.pth")
    key = "transformer.layers.1.self_attn.w_ks.weight"
    if change == "drop":
        del state[key]
    elif change == "add":
        state["surprise.weight"] = torch.zeros(1)
    elif change == "shape":
        state[key] = torch.zeros(3, 3)
    elif change == "kwargs":
        kwargs["n_experts"] = 4
    else:
        del state["transformer.layers.0.feed_forward.w_1.lora_B"]
    with pytest.raises(ImportError_, match=message):
        convert_state(kwargs, state)


def test_a_lora_of_another_model_is_refused(tmp_path):
    lora = torch.load(FIXTURE / "coarse_lora.pth", weights_only=True)
    torch.save({k.replace("layers.1.", "layers.7."): v for k, v in lora.items()}, tmp_path / "other.pth")
    with pytest.raises(ImportError_, match="not adapters of"):
        import_vampnet(tmp_path / "out", FIXTURE / "codec.pth", coarse=FIXTURE / "coarse.pth", coarse_lora=tmp_path / "other.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(ImportError_, match="not a LoRA state dict"):
        import_vampnet(tmp_path / "out", FIXTURE / "codec.pth", coarse=FIXTURE / "coarse.pth", coarse_lora=tmp_path / "plain.pth")


def test_a_codec_that_does_not_match_the_models_is_refused(tmp_path, capsys):
    dac_path = make_synthetic_codec(tmp_path / "dac.pth", SyntheticCodecSpec(n_codebooks=4, codebook_size=32,
                                                                            encoder_dim=4, decoder_dim=16))
    assert cli_main(["import-vampnet", "--codec", str(dac_path), "--c2f", str(FIXTURE / "c2f.pth"),
                     "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "vocab_size 64 != codec codebook_size 32" in err and "n_codebooks 6 > codec's 4" in err
    with pytest.raises(ImportError_, match="not a LAC codec checkpoint"):
        from vampnet_pl.model.import_vampnet import convert_codec

        convert_codec(FIXTURE / "coarse.pth", tmp_path / "x.pth")


@pytest.mark.parametrize("flag, given, role", [("--coarse", "c2f.pth", "a c2f model"), ("--c2f", "coarse.pth", "a coarse model")])
def test_a_model_given_in_the_other_stages_place_is_refused(tmp_path, capsys, flag, given, role):
    assert cli_main(["import-vampnet", "--codec", str(FIXTURE / "codec.pth"), flag, str(FIXTURE / given),
                     "--out-dir", str(tmp_path)]) == 2
    assert f"{given} is {role}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))  # no coarse.pt holding a c2f model (or the reverse)


def test_a_folder_given_for_the_lora_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "latest").mkdir()  # the original's run folder (runs/NAME/coarse/latest/lora.pth)
    assert cli_main(["import-vampnet", "--codec", str(FIXTURE / "codec.pth"), "--coarse", str(FIXTURE / "coarse.pth"),
                     "--coarse-lora", str(tmp_path / "latest"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "latest is a folder: give the lora.pth in it" in capsys.readouterr().err


def test_the_original_codec_is_not_overwritten_by_its_conversion(tmp_path, capsys):
    for name in ("codec.pth", "coarse.pth"):  # the release unzipped, and the import's output sent to that folder
        (tmp_path / name).write_bytes((FIXTURE / name).read_bytes())
    assert cli_main(["import-vampnet", "--codec", str(tmp_path / "codec.pth"), "--coarse", str(tmp_path / "coarse.pth"),
                     "--out-dir", str(tmp_path)]) == 2
    assert "the converted codec would be written over this original" in capsys.readouterr().err
    assert (tmp_path / "codec.pth").read_bytes() == (FIXTURE / "codec.pth").read_bytes()


def test_an_original_checkpoint_given_as_a_model_points_to_the_import(imported):
    """``init_from=coarse.pth`` (the original's file, not its conversion) was told to use `vampnet-pl export`,
    which refuses that file too."""
    from vampnet_pl.training.module import MaskedTokenModule

    cfg = load_exported(imported / "coarse.pt").cfg
    with pytest.raises(ValueError, match=r"coarse.pth is an original VampNet checkpoint .*`vampnet-pl import-vampnet`"):
        MaskedTokenModule(cfg, init_from=str(FIXTURE / "coarse.pth"))
    with pytest.raises(ValueError, match="original VampNet checkpoint"):
        load_exported(FIXTURE / "c2f.pth")
