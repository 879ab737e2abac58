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
