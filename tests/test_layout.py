"""The source root `platform/` must never shadow Python's standard library `platform` module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_gives_stdlib():
    code = "import platform, ajepa; print(platform.python_version()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    version, location = out.stdout.split()
    assert version == ".".join(map(str, sys.version_info[:3]))
    assert not location.startswith(str(ROOT))


def test_pytest_from_repo_root_sees_stdlib_platform():
    import platform

    assert callable(platform.system) and not platform.__file__.startswith(str(ROOT))
