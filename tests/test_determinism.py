"""Determinism (SPEC.md): the same inputs give bit-identical outputs and gradients run after run in a
process, also under ``torch.use_deterministic_algorithms(True)``; nothing is recorded for autograd under
no_grad / inference_mode."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from .conftest import Case, build_case, case_ids, make_input, run_case

DET_CASES = [
    Case("ms", dict(scales=(1, 2, 3), down_mode="avg", norm="batch"), (2, 5, 13, 11), torch.float32, train=True,
         label="det"),
    Case("ms", dict(scales=(1, 2, 4), down_mode="bilinear", activation="gelu", kernel_size=(3, 1, 5)),
         (3, 17, 16, 15), torch.float32, layout="channels_last", label="det"),
    Case("ms", dict(scales=(1, 3), down_mode="nearest", up_mode="nearest", norm="batch"), (2, 4, 10, 9),
         torch.float64, layout="slice_h", label="det"),
    Case("psp", dict(bins=(1, 2, 3, 6), bias=(True, False, False, False), norm=(None, "batch", "batch", "batch"),
                     align_corners=True, input_position="last"), (3, 20, 13, 12), torch.float32, train=True,
         layout="channels_last", label="det_psp_smp"),
    Case("psp", dict(bins=((2, 5), 3)), (2, 6, 9, 7), torch.float64, label="det"),
]


def _run(fused, x, g):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    params = list(fused.parameters())
    out = fused(x)
    grads = torch.autograd.grad(out, [x] + params, g)
    return [out.detach()] + list(grads) + [b.clone() for b in fused.buffers()]


@contextlib.contextmanager
def deterministic(on: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("det", [False, True], ids=["default", "deterministic_algorithms"])
@pytest.mark.parametrize("case", DET_CASES, ids=case_ids(DET_CASES))
def test_bit_identical_repeats(case, det):
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype, case.layout)
    g = torch.randn(case.shape[0], fused.out_channels, *case.shape[2:], dtype=case.dtype)
    with deterministic(det):
        runs = [_run(copy.deepcopy(fused), x, g) for _ in range(3)]
        # The same module object (running statistics evolving between calls) gives the same gradients too
        # in train mode (they do not depend on the running statistics) and in eval mode (state unchanged).
        same_module = [_run(fused, x, g)[:-len(list(fused.buffers())) or None] for _ in range(3)]
    for r in runs[1:]:
        assert len(r) == len(runs[0])
        for i, (a, b) in enumerate(zip(runs[0], r)):
            assert torch.equal(a, b), f"result {i} differs between identical runs"
    for r in same_module[1:]:
        for i, (a, b) in enumerate(zip(same_module[0], r)):
            assert torch.equal(a, b), f"result {i} differs between calls of the same module"


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_nothing_recorded_without_grad(ctx):
    case = Case("psp", dict(bins=(1, 2, 3)), (2, 4, 9, 9), torch.float32, train=True)
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype).requires_grad_(True)
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    counts = [int(m.num_batches_tracked) for m in norms]
    with getattr(torch, ctx)():
        out = fused(x)
    assert out.grad_fn is None and not out.requires_grad
    # Running statistics are still updated in train mode, as nn.BatchNorm2d does under no_grad.
    assert [int(m.num_batches_tracked) for m in norms] == [c + 1 for c in counts]


@pytest.mark.parametrize("case", DET_CASES[:2] + DET_CASES[3:4], ids=case_ids(DET_CASES[:2] + DET_CASES[3:4]))
def test_deterministic_algorithms_match_the_reference(case):
    """Under torch.use_deterministic_algorithms(True) the fused module runs (nothing it calls refuses) and
    gives the reference's numbers (SPEC.md's tolerances), gradients included."""
    with deterministic(True):
        run_case(case)
