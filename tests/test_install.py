"""tools/install.sh: a second run with unchanged inputs installs nothing and changes nothing."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_second_install_run_changes_nothing():
    stamp = os.path.join(REPO, ".venv", ".smallbn_d2-install")
    assert os.path.exists(stamp), "tests run from the .venv that tools/install.sh created"
    before = os.stat(stamp).st_mtime_ns
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "install.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    assert os.stat(stamp).st_mtime_ns == before
