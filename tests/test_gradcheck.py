"""float64 ``torch.autograd.gradcheck`` of the fused modules' forward w.r.t. x and every parameter."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from .conftest import Case, build_case, case_ids, make_input

GRADCHECK_CASES = [
    Case("ms", dict(scales=(1, 2, 3), down_mode="avg", norm="batch", activation="silu", branch_channels=2),
         (2, 2, 7, 6), train=True, label="gc"),
    Case("ms", dict(scales=(1, 2), down_mode="bilinear", align_corners=True, norm="batch", activation="gelu",
                    branch_channels=2, input_position="last"), (2, 3, 5, 7), train=False, label="gc"),
    Case("ms", dict(scales=(1, 3), down_mode="nearest", up_mode="nearest", kernel_size=(3, 1), activation=None,
                    branch_channels=(2, 3), input_position=None), (2, 2, 7, 7), layout="channels_last", label="gc"),
    Case("psp", dict(bins=(1, 2, (2, 3)), branch_channels=2, activation="silu", bias=True), (3, 2, 7, 5), train=True,
         label="gc"),
    Case("psp", dict(bins=(1, 2, 4), branch_channels=2, kernel_size=3, bias=(True, False, False),
                     norm=(None, "batch", "batch"), align_corners=True, activation="gelu", input_position="last"),
         (2, 2, 6, 5), train=False, layout="slice_h", label="gc_psp_smp"),
    Case("ms", dict(scales=(1, 2), norm="batch", activation="relu", branch_channels=2, down_mode="bilinear"),
         (2, 2, 6, 6), train=False, norm_overrides={1: dict(track_running_stats=False)}, label="gc_batchstats_eval"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_ids(GRADCHECK_CASES))
def test_gradcheck(case):
    _, fused = build_case(case)
    assert case.dtype == torch.float64
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in fused.named_parameters()]
    buffers = dict(fused.named_buffers())
    x = make_input(case.shape, torch.float64, case.layout).detach().requires_grad_(True)
    calls = []

    def f(x, *ps):
        calls.append(1)
        # Buffers are passed as clones so that the train-mode running-statistics updates of gradcheck's
        # many calls do not accumulate (they do not affect the output in train mode anyway).
        state = {**{n: p for n, p in zip(names, ps)}, **{n: b.clone() for n, b in buffers.items()}}
        return functional_call(fused, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert calls, "gradcheck never called the module"
