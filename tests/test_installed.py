"""The suite tests what users install. Under .ci/run (``MULTITRACK_TEST_INSTALLED=1``) and in CI,
``multitrack`` must be the built wheel installed into the environment, not this checkout's
``src/``: an editable install or a path entry would hide packaging and import-path bugs (a
module left out of the wheel, a file read from the source tree)."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

import multitrack

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "multitrack"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
REQUIRED = os.environ.get("MULTITRACK_TEST_INSTALLED") == "1" or IN_CI

pytestmark = pytest.mark.skipif(
    not REQUIRED, reason="run from a source checkout (CI and .ci/run test the installed wheel)"
)
INSTALLED = Path(multitrack.__file__).resolve().parent


def test_multitrack_is_imported_from_site_packages_not_the_checkout() -> None:
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()

    assert purelib / "multitrack" == INSTALLED, f"imported from {INSTALLED}"
    assert not INSTALLED.is_relative_to(ROOT)
    paths = {Path(p or os.getcwd()).resolve() for p in sys.path}
    assert ROOT / "src" not in paths, "the checkout's src/ is on sys.path"


def test_it_was_installed_from_a_wheel_not_editable() -> None:
    dist = metadata.distribution("multitrack")
    direct_url = dist.read_text("direct_url.json")

    assert direct_url is not None, "no direct_url.json: not installed from the built wheel"
    origin = json.loads(direct_url)
    assert "archive_info" in origin and origin["url"].endswith(".whl"), origin
    purelib = Path(sysconfig.get_paths()["purelib"])
    for pth in purelib.glob("*.pth"):  # how editable installs and path hacks reach src/
        assert str(ROOT) not in pth.read_text(), f"{pth} points into the checkout"


def test_the_wheel_holds_every_module_of_the_package() -> None:
    def files(top: Path) -> set[str]:
        return {
            str(p.relative_to(top))
            for p in top.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    assert files(INSTALLED) == files(SOURCE)
    assert (INSTALLED / "py.typed").is_file()


def test_the_console_script_is_installed() -> None:
    script = Path(sysconfig.get_paths()["scripts"]) / "multitrack"

    assert script.is_file() and os.access(script, os.X_OK)
