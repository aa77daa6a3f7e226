"""ffnskip.procs.Child: children of a killed parent do not outlive it (real processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = """
import sys
from pathlib import Path
from ffnskip.procs import Child
child = Child("sleeper", ["sleep", "300"], Path(sys.argv[1]) / "sleeper.log").start()
print(child.process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _state(pid: int) -> str:
    """The process state letter, or "" once it is gone (a reparented zombie may linger)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_a_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    pid = int(parent.stdout.readline())
    assert _state(pid) not in ("", "Z"), "the child should be running before its parent dies"
    parent.kill()  # SIGKILL: no cleanup code runs in the parent
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _state(pid) not in ("", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)  # polling an observable state with a deadline
    assert _state(pid) in ("", "Z"), "the child outlived its killed parent"
