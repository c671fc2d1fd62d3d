"""The Triton kernels as a GPU launches them, run in Triton's interpreter.

Under the interpreter the launchers pick their own launch parameters: few, large tiles (it pays per operation,
not per element) and one configuration per autotuned kernel. So the rest of the suite never runs the tile
sizes, autotune configurations and split counts that a GPU gets, and a mask or an index that is wrong only for
those (a ragged last tile of BLOCK_K = 16 input channels, a reduction split over 264 programs) would first show
on a GPU, as a wrong result or an illegal memory access.

Here the launchers take their GPU branches (``launch.interpreting`` answers False; only bfloat16's products
are still widened, as the interpreter needs: tests/triton_compile_check.py compiles the unwidened ones), and
each case runs once per configuration index of the production autotune lists (a kernel with a shorter list
takes its last): every configuration of every list a case reaches has its results checked against the float64
reference as everywhere else, with every memory access bounds-checked (tests/triton_bounds.py, on for the
whole suite). The one-off sweep of every case of test_triton.py and the projection's Triton cases so took 5
minutes and found nothing; these few cases keep the paths covered at about a minute.
"""

from __future__ import annotations

import pytest
import torch
import triton

import msfused
from msfused.triton import launch

from . import test_projection as TP
from . import test_triton as T
from .conftest import Case, case_ids, check_half_precision_grads, run_case

OK, WHY = msfused.availability("triton")
pytestmark = pytest.mark.skipif(not (OK and launch.interpreting()),
                                reason=f"needs Triton's interpreter (a GPU runs the real launches): {WHY}")


def _production_configs():
    """Each autotuner's production list, as a GPU gets it: ``launch`` built its tuners at import with the
    interpreter's one configuration each; the lists are made again here with ``interpreting`` answering False."""
    lists = {}
    for tuned, make in ((launch.conv_tuned, launch._conv_configs), (launch.convs_tuned, launch._convs_configs),
                        (launch.block_tuned, launch._block_configs)):
        for kind, tuner in tuned.items():
            lists[id(tuner)] = make(kind)
    return lists


class GpuLaunches:
    """``launch._launch`` replaced: each launch runs in the interpreter with configuration ``index`` of its
    production autotune list (its last where the list is shorter; a pinned kernel's one); which kernels ran
    and how long their lists were is kept for the test's checks."""

    def __init__(self):
        self.lists = _production_configs()
        self.index = 0
        self.kernels = {}  # kernel name -> length of its list

    @property
    def longest(self) -> int:
        return max(len(configs) for configs in self.lists.values())

    def __call__(self, kernel, grid, *args, **meta):
        if isinstance(kernel, triton.runtime.autotuner.Autotuner):
            configs, fn = self.lists.get(id(kernel), kernel.configs), kernel.fn
        else:
            configs, fn = [triton.Config({})], kernel
        self.kernels[getattr(fn, "__name__", str(fn))] = len(configs)
        fn[grid](*args, **meta, **configs[min(self.index, len(configs) - 1)].kwargs)


@pytest.fixture
def gpu_launches(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    every = GpuLaunches()
    monkeypatch.setattr(launch, "_upcast", lambda x: x.dtype == torch.bfloat16)  # the interpreter's bf16 dot
    monkeypatch.setattr(launch, "_launch", every)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(launch, "POISON", True)
    with msfused.use_backend("triton"):
        yield every


def _every_config(gpu_launches, check, tuned: bool, indices=None) -> None:
    """``check()`` once per configuration index of the longest list (or of ``indices``; fresh inputs each
    time); with ``tuned``, that some autotuned kernel ran a list longer than one."""
    for index in (range(gpu_launches.longest) if indices is None else indices):
        gpu_launches.index = index
        check()
        if index == 0 and tuned:
            tuned = {name: n for name, n in gpu_launches.kernels.items() if n > 1}
            assert tuned, f"no autotuned kernel ran its production list: {gpu_launches.kernels}"
        if index == 0 and max(gpu_launches.kernels.values()) == 1:
            break  # one configuration each: nothing more to run


CASES = [
    # factor pyramid, float64, training with batch statistics: levels, convs (5 input channels: taps in K), ups,
    # adjoints, weight gradients (pixel ranges split to fill the GPU), dx
    Case("ms", dict(scales=(1, 2, 4), kernel_size=(3, 1, 3), branch_channels=(3, 4, 2), norm="batch",
                    down_mode="bilinear", activation="silu"), (2, 5, 13, 11), train=True, steps=1, label="gpu"),
    # bins, float32, channels_last, folded norm, bilinear with align_corners, x last: 17 input channels (a
    # ragged last step of 16), every configuration of the float32 lists
    Case("psp", dict(bins=(1, 2, 3, 6), up_mode="bilinear", align_corners=True, norm="batch", kernel_size=(1, 1, 3, 1),
                     input_position="last", branch_channels=3), (1, 17, 12, 9), torch.float32, "channels_last",
         train=False, label="gpu"),
    # bfloat16 training: the half-precision lists (a smooth activation: a ReLU's mask flips on a map this small
    # make one draw's error heavy-tailed enough to decide the mean of 8, for the naive module as for the fused)
    Case("ms", dict(scales=(1, 2), kernel_size=3, branch_channels=(4, 3), norm="batch", activation="silu"),
         (1, 16, 7, 10), torch.bfloat16, train=True, label="gpu"),
    # a projection (its Triton passes, per-tap parts)
    TP.TRITON_CASES[3],
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_gpu_launch_parameters(case, gpu_launches):
    """Training steps (forward and backward) and their checks against the float64 reference, under every
    configuration of the GPU's lists."""
    indices = None
    if case.dtype in (torch.float16, torch.bfloat16):
        # SPEC's rule on the mean of 8 draws (one draw's error is heavy-tailed), so two configurations, not all:
        # index 0 steps 32 input channels, index 3 steps 64 (conv_kernel's and convs_kernel's half-precision lists)
        check = lambda: check_half_precision_grads(case, trials=8)  # noqa: E731
        indices = (0, 3)
    else:
        check = lambda: run_case(case)  # noqa: E731
    # (float64 is not tuned; the projection's own passes are not, its convolutions are ATen's)
    _every_config(gpu_launches, check, tuned=case.dtype != torch.float64 and "project" not in case.kwargs,
                  indices=indices)


INFERENCE_CASES = [
    Case("ms", dict(scales=(1, 3), down_mode="bilinear", up_mode="bilinear", align_corners=True, kernel_size=(5, 3),
                    activation="gelu", input_position="last", branch_channels=(2, 20)), (1, 3, 10, 17),
         torch.float32, layout="slice_h", label="inf"),
    T.INFERENCE_CASES[4],
]


@pytest.mark.slow
@pytest.mark.parametrize("case", INFERENCE_CASES, ids=case_ids(INFERENCE_CASES))
def test_gpu_launch_parameters_inference(case, gpu_launches):
    """The inference operator (block_kernel for these small blocks; tiles wider than a GPU's 8 or 16 columns)
    against the float64 reference, under every configuration of the GPU's lists."""
    _every_config(gpu_launches, lambda: T.test_inference_path(case), tuned=True)
