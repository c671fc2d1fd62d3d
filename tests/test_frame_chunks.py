"""tests/frame_chunks.py: the test process's cache of CPython's frame-stack chunks is installed and works."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import frame_chunks

ROOT = Path(__file__).resolve().parents[1]

# Calls to every depth up to 600 frames, again and again: the depths whose deepest frame opens a chunk map and
# unmap it on every call, each map a fresh page to fault in. Prints the minor page faults of the loop.
_CALLS = textwrap.dedent(
    """
    import resource, sys
    if sys.argv[1] == "cache":
        from tests import frame_chunks
        assert frame_chunks.install() is None, frame_chunks.reason()

    def down(n):
        return 0 if n == 0 else down(n - 1) + 1

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for depth in range(0, 600, 3):
        for _ in range(200):
            down(depth)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CALLS, mode], capture_output=True, text=True, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_installed_in_this_process():
    # The suite's own process (tests/conftest.py installs it); where a C compiler is missing, it says why.
    if frame_chunks.reason() is not None and "compiler" in frame_chunks.reason():
        pytest.skip(f"not installed here: {frame_chunks.reason()}")
    assert frame_chunks.reason() is None


def test_chunks_are_reused_not_mapped_again():
    if frame_chunks.reason() is not None:
        pytest.skip(f"not installed here: {frame_chunks.reason()}")
    plain, cached = _faults("plain"), _faults("cache")
    # Seen on CPython 3.11: ~200,000 faults plain, ~20 with the cache (a Python whose frame stack does not map
    # and unmap per call would show few in both).
    assert cached < max(1000, plain // 20), (plain, cached)
