"""docs/kaggle.md's wheel command against setup.cfg: every requirement that Kaggle does not ship is downloaded
with setup.cfg's spec, for a Python that setup.cfg allows and platforms that carry LightGBM 4's wheels.
No network: pip's tag matching is redone with `packaging`, the library pip uses for it."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "kaggle.md").read_text()

# What the Kaggle Python image ships and builds itself (its CUDA torch, the numpy/scipy ABI): never downloaded.
KAGGLE_SHIPS = {"torch", "torchvision", "numpy", "scipy", "scikit-learn", "pillow", "matplotlib"}


def _setup_requirements() -> tuple[dict[str, SpecifierSet], SpecifierSet]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    return {canonicalize_name(r.name): r.specifier for r in reqs}, SpecifierSet(cfg["options"]["python_requires"])


def _download_command() -> tuple[dict[str, list[str]], dict[str, SpecifierSet]]:
    """The documented `pip download` as (options -> values, requirement name -> spec)."""
    blocks = re.findall(r"```\n(.*?)```", DOC, flags=re.S)
    (block,) = [b for b in blocks if "pip download" in b]
    line = next(ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip().startswith("pip download"))
    words = shlex.split(line)[2:]
    options: dict[str, list[str]] = {}
    reqs: dict[str, SpecifierSet] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and "=" in word:
            options.setdefault(word.split("=")[0], []).append(word.split("=", 1)[1])
        elif word in ("--no-deps",):
            options[word] = []
        elif word.startswith("-"):
            options.setdefault(word, []).append(words[i + 1])
            i += 1
        else:
            req = Requirement(word)
            reqs[canonicalize_name(req.name)] = req.specifier
        i += 1
    return options, reqs


def _shipped() -> set[str]:
    (names,) = re.findall(r"\*\*Shipped by Kaggle, not downloaded:\*\* ([^.]+)\.", DOC)
    return {canonicalize_name(n.strip()) for n in names.split(",")}


def test_every_requirement_is_downloaded_with_its_spec_or_shipped_by_kaggle():
    required, _ = _setup_requirements()
    _, downloaded = _download_command()
    shipped = _shipped()
    assert shipped <= KAGGLE_SHIPS, shipped - KAGGLE_SHIPS
    assert not shipped & set(downloaded), "a package both downloaded and said to be shipped"
    assert set(downloaded) | shipped == set(required), set(required) ^ (set(downloaded) | shipped)
    for name, spec in downloaded.items():
        assert spec == required[name], f"{name}: the doc downloads {spec}, setup.cfg asks {required[name]}"
    assert "lightgbm" in downloaded and "3.3.5" not in required["lightgbm"]  # the image's 3.x is refused


def test_the_command_resolves_binary_wheels_only_without_what_kaggle_ships():
    options, _ = _download_command()
    assert options["--only-binary"] == [":all:"]
    assert "--no-deps" in options  # else pip downloads numpy and scipy, which are the image's
    assert options["-d"] == ["wheels/"]


def test_python_and_platform_tags_carry_lightgbm_4_and_the_compiled_wheels():
    options, _ = _download_command()
    _, python_requires = _setup_requirements()
    (version,) = options["--python-version"]
    assert version in python_requires, f"--python-version {version}: setup.cfg asks {python_requires}"
    major, minor = (int(x) for x in version.split("."))
    assert options["--implementation"] == ["cp"] and options["--abi"] == [f"cp{major}{minor}"]
    supported = set(tags.cpython_tags((major, minor), abis=[f"cp{major}{minor}"], platforms=options["--platform"]))
    supported |= set(tags.compatible_tags((major, minor), f"cp{major}{minor}", options["--platform"]))
    py = f"cp{major}{minor}"
    # Real PyPI file names: LightGBM 4 is manylinux_2_28 only; h5py and scikit-image are manylinux_2_17.
    for wheel in ("lightgbm-4.5.0-py3-none-manylinux_2_28_x86_64.whl",
                  f"h5py-3.12.1-{py}-{py}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                  f"scikit_image-0.24.0-{py}-{py}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                  "click-8.1.7-py3-none-any.whl", "tqdm-4.66.5-py3-none-any.whl"):
        assert parse_wheel_filename(wheel)[3] & supported, f"{wheel} does not install for these tags"


def test_manylinux2014_alone_would_not_carry_lightgbm_4():
    """Why the doc's platforms changed: the old `--platform manylinux2014_x86_64` cannot install LightGBM 4."""
    old = set(tags.compatible_tags((3, 11), "cp311", ["manylinux2014_x86_64"]))
    assert not parse_wheel_filename("lightgbm-4.5.0-py3-none-manylinux_2_28_x86_64.whl")[3] & old
    assert parse_wheel_filename("lightgbm-3.3.5-py3-none-manylinux1_x86_64.whl")[3] & set(
        tags.compatible_tags((3, 11), "cp311", ["manylinux2014_x86_64", "manylinux1_x86_64"]))
