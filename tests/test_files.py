import subprocess
import sys

import pytest

from custom.atomic_write import write_atomic
from tests.conftest import REPO


def test_write_atomic_creates_folders_and_replaces_whole(tmp_path):
    target = tmp_path / "a" / "b" / "summary.json"
    write_atomic(target, lambda tmp: tmp.write_text("first"))
    assert target.read_text() == "first" and not (target.parent / "summary.json.tmp").exists()
    write_atomic(target, lambda tmp: tmp.write_text("second"))
    assert target.read_text() == "second"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "per_image.csv"
    target.write_text("old, complete")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, crash)
    assert target.read_text() == "old, complete"  # only the .tmp file holds the half write
    assert (tmp_path / "per_image.csv.tmp").read_text() == "half"


def test_custom_loads_submodules_on_first_use():
    """`import custom` stays light (no torch) until a config expression reaches a submodule."""
    code = ("import sys, custom; assert 'torch' not in sys.modules; from custom.atomic_write import write_atomic; "
            "assert 'torch' not in sys.modules; custom.inference.postprocess.OTSU; assert 'torch' in sys.modules; "
            "assert 'inference' in dir(custom)\n"
            "try:\n    custom.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\nelse:\n    raise SystemExit('no error')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
