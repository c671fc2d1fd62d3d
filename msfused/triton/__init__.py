"""The Triton backend ('triton'): the block's kernels (``kernels.py``), their launchers (``launch.py``),
the resize tap tables (``tables.py``) and the operators with fake kernels and autograd (``ops.py``); the
block with its projection (``projection.py``: its kernels, launchers and operators).

Runs CUDA tensors, and CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``, which must be
set before msfused is imported: Triton reads it when the kernels are defined).
"""

from __future__ import annotations

from typing import Optional

_error: Optional[str] = None
try:
    import triton  # noqa: F401
except ImportError as e:  # triton is optional (the 'triton' extra)
    _error = f"triton is not installed ({e}); pip install 'triton>=3.6'"
else:
    from . import ops  # noqa: F401  (registers the operators)
    from . import projection  # noqa: F401  (the block with its projection: its operators)
    from .launch import interpreting


def load_error() -> Optional[str]:
    """Why the Triton backend cannot be used on this machine at all (None if it can)."""
    return _error


def runs_on(device_type: str) -> Optional[str]:
    """Why the Triton kernels cannot run tensors of ``device_type`` (None if they can)."""
    if _error is not None:
        return _error
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting():
            return None
        return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1 before importing msfused)"
    return f"the Triton kernels run CUDA tensors, x is on {device_type}"
