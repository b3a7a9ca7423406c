"""The package layout keeps Python's standard `platform` module reachable (DESIGN §1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_platform_folder() -> None:
    assert not (ROOT / "platform").exists()
    assert not (ROOT / "platform.py").exists()


def test_import_platform_from_repo_root_is_stdlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import platform, sys; print(platform.__file__); print(platform.system())"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    module_file = Path(out[0]).resolve()
    assert ROOT not in module_file.parents
    assert out[1] in {"Linux", "Darwin", "Windows"}


def test_core_subpackage_imports_without_ray() -> None:
    code = "import sys, sflam.platform.runtime; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
