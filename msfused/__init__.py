"""msfused: fused kernels for multi-scale CNN blocks (pyramid pooling, multi-scale pyramids).

Swap :class:`MultiScaleBlock` / :class:`PyramidPooling` into a model (same constructor and ``state_dict``
as the naive :class:`NaiveMultiScaleBlock` / :class:`NaivePyramidPooling`, or :func:`convert` a model in
place) and the whole block runs in fused kernels, forward and backward. See SPEC.md for what is computed.
"""

from . import _ops  # noqa: F401  (loads msfused._C and registers the operators' fake kernels)
from . import autotune  # noqa: F401  ('auto' by measurement: msfused.autotune.report(), save(), load(), warmup())
from . import triton as _triton  # noqa: F401  (registers the Triton operators, if triton is installed)
from ._version import __version__
from .backends import BACKENDS, availability, use_backend
from .functional import multi_scale
from .fx_fuse import fuse
from .modules import ConvertRecord, ConvertReport, MultiScaleBlock, PyramidPooling, convert, revert
from .naive import NaiveMultiScaleBlock, NaivePyramidPooling

__all__ = [
    "BACKENDS",
    "ConvertRecord",
    "ConvertReport",
    "MultiScaleBlock",
    "NaiveMultiScaleBlock",
    "NaivePyramidPooling",
    "PyramidPooling",
    "__version__",
    "availability",
    "convert",
    "fuse",
    "multi_scale",
    "revert",
    "use_backend",
]
