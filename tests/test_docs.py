"""The user documentation agrees with the project: what README.md says a fresh machine needs, and what its commands
give as settings, is what setup.cfg and conf/ accept."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def setup_options() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return parser["options"]


def pinned_requirements() -> list[Requirement]:
    """setup.cfg's install_requires and extras, each ``name==version``."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    lines = [*parser["options"]["install_requires"].splitlines(),
             *(line for extra in parser["options.extras_require"].values() for line in extra.splitlines())]
    return [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_the_readmes_python_versions_are_setup_cfgs_and_install_every_pin():
    """The README offered Python 3.10, but numpy, scipy, av and matplotlib are pinned to releases that need 3.11."""
    low, high = re.search(r"fresh machine: Python (3\.\d+)–(3\.\d+)", README).groups()
    supported = SpecifierSet(setup_options()["python_requires"])
    minor = lambda version, step: f"3.{int(version.split('.')[1]) + step}"  # noqa: E731
    assert Version(low) in supported and Version(high) in supported, (low, high, supported)
    assert Version(minor(low, -1)) not in supported and Version(minor(high, 1)) not in supported, (low, high, supported)
    refused, checked = [], 0
    for pin in pinned_requirements():
        try:
            dist = metadata.distribution(pin.name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version not in pin.specifier:  # another release installed: its metadata is not the pin's
            continue
        checked += 1
        needs = dist.metadata.get("Requires-Python")
        if needs and Version(low) not in SpecifierSet(needs):
            refused.append(f"{pin} needs Python {needs}")
    assert checked >= 15, "the pinned releases are installed here, so their metadata can be read"
    assert refused == [], f"setup.cfg and README say Python {low} is supported, but: {refused}"


DOCS = ("README.md", "slurm/README.md")
SCRIPTS = {"slurm/prep.sh": "prep", "slurm/train.sh": "train", "slurm/eval.sh": "eval"}  # their args: overrides


def documented_commands() -> list[tuple[str, list[str]]]:
    """(doc, words) of every command line in the docs' bash blocks, the environment assignments before it dropped;
    and of the README's ``make demo ARGS="..."``."""
    import shlex

    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words.pop(0)
                if words:
                    found.append((doc, words))
        found += [(doc, ["make", "demo", *shlex.split(args)]) for args in re.findall(r'make demo ARGS="([^"]*)"', text)]
    return found


def override_sets(words: list[str]) -> list[list[str]]:
    """The Hydra overrides among ``words``, one set per value of a swept key (``masking=cosine,span``). Hydra flags
    (``-m``) and ``hydra/`` groups are left out (tests/test_slurm_scripts.py composes the launcher)."""
    overrides = [w for w in words if "=" in w and not w.startswith(("-", "hydra/"))]
    sets = [[o.split("=", 1)[0] + "=" + re.split(r",(?![^\[]*\])", o.split("=", 1)[1])[0] for o in overrides]]
    for i, override in enumerate(overrides):
        key, value = override.split("=", 1)
        for other in re.split(r",(?![^\[]*\])", value)[1:]:
            sets.append([*sets[0][:i], f"{key}={other}", *sets[0][i + 1:]])
    return sets


def check_command(words: list[str]) -> str:
    """Parse a documented command as the CLI (or the SLURM script) does, and compose the config it names; returns
    what was checked."""
    from vampnet_pl.cli import build_parser, generation_config
    from vampnet_pl.config import compose

    program = words[0]
    if program == "make":
        assert words[1] in ("demo", "test", "test-fast"), words
        if words[1] == "demo":
            for overrides in override_sets(words[2:]):
                compose("demo", overrides)
        return "make"
    if program in SCRIPTS:
        for overrides in override_sets(words[1:]):
            compose(SCRIPTS[program], overrides)
        return SCRIPTS[program]
    assert program.endswith("vampnet-pl"), f"not a command of this project: {words}"
    stage = words[1]
    if stage in ("train", "eval"):  # Hydra apps: everything after the stage is theirs
        for overrides in override_sets(words[2:]):
            compose(stage, overrides)
        return stage
    args = build_parser().parse_args(words[1:])
    if stage == "prep" and args.stage not in ("verify", "repair"):  # those two read out_dir only
        compose("prep", args.overrides)
    if stage == "vamp":
        generation_config(args)
    if stage == "ablate" and args.action == "run":
        assert (ROOT / args.target).is_file(), args.target
    return stage


def test_every_documented_command_parses_and_composes():
    """Each ``vampnet-pl`` command, SLURM submit and ``make`` target in the READMEs' code blocks is accepted: its
    flags by the CLI's parser, its overrides by the config it composes (schemas and registries included)."""
    checked = []
    for doc, words in documented_commands():
        if words[0] in ("squeue", "tail", "scontrol", "scancel", "tensorboard", "export") or any(
                w.startswith("<") for w in words):  # SLURM's and the shell's commands; a placeholder (<the same overrides>)
            continue
        try:
            checked.append(check_command(words))
        except (Exception, SystemExit) as err:  # argparse exits
            raise AssertionError(f"{doc}: {' '.join(words)}: {err!r}") from None
    assert {"make", "prep", "train", "eval", "export", "vamp", "import-vampnet", "ablate"} <= set(checked), checked


def test_the_readmes_sampling_defaults_are_vamps():
    """The README gave c2f's mask temperature (1.0) as if it were both stages'; vamp's coarse default is 10.5."""
    from vampnet_pl.cli import build_parser, generation_config

    found = re.search(r"the defaults: coarse (\d+) passes at mask temperature ([\d.]+), c2f (\d+) passes at ([\d.]+)",
                      README)
    assert found, "the README states both stages' passes and mask temperatures"
    cfg = generation_config(build_parser().parse_args(["vamp", "in.wav", "--coarse", "c.pt", "--codec", "44khz"]))
    assert (cfg.coarse.passes, cfg.coarse.mask_temperature, cfg.c2f.passes, cfg.c2f.mask_temperature) == (
        int(found[1]), float(found[2]), int(found[3]), float(found[4]))
