"""The CUDA C++ backend's launch plan (msfused/cuda_plan.py, ``python -m msfused explain --backend cuda``):
every workload of WORKLOADS.md, inference and training, float32 and bfloat16, recorded at its full size from
the launchers' record-only mode in the emulation build (the same launcher source as the GPU build, sized for
an H100's 132 multiprocessors), on meta tensors. The launch counts are the ones docs/BACKENDS.md and the
comment at the top of csrc/cuda/multi_scale_kernels.cu document; no launch may leave the GPU idle behind a
few long programs (plan.py's rule: fewer than 2 x 132 blocks running a serial loop of more than 1,024
steps); recording launches nothing. Figures are estimates.

Needs the CUDA toolkit's headers (the emulation build; shared with tests/test_cuda_emulation.py, which
builds it in the same cache).
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from msfused import cuda_plan
from msfused.bench.floor import count_work
from msfused.bench.workloads import WORKLOADS
from msfused.functional import _norm_epilogue
from msfused.triton.plan import MIN_WAVES, SERIAL_LIMIT

pytestmark = pytest.mark.skipif(cuda_plan.unavailable_reason() is not None,
                                reason=str(cuda_plan.unavailable_reason()))


@pytest.fixture(scope="module")
def survey():
    cuda_plan.emulation_library()
    return cuda_plan.survey()


def documented_counts(name: str, mode: str):
    """({stage: {kernel: launches}}, {stage: {convolution op: calls}}) of one call as docs/BACKENDS.md ("CUDA
    backend") counts them, for blocks of at most 8 branches, all factor or all bins (one levels launch:
    gathers or pooling)."""
    w = WORKLOADS[name]
    with torch.device("meta"):
        module = w.fused_class(w.channels, **w.config).train(mode == "train")
    stats = [_norm_epilogue(b.conv, b.norm)[3] for b in module.branches]
    B, S, any_stats = len(stats), sum(stats), int(any(stats))
    project = getattr(module, "project", None)
    x_part = int(module.spec.input_position is not None)
    fwd = "inference" if mode == "inference" else "forward"
    counts = {fwd: {"levels": 1, "stats_partial": any_stats, "merge_stats": any_stats}}
    convs = {fwd: {"aten.convolution": B}}
    if mode == "train":  # each convolution's backward: data, weight (and bias) gradients in one ATen call
        convs["backward"] = {"aten.convolution_backward": B}
    if project is None:
        counts[fwd]["epilogue_up"] = 1
        if mode == "train":
            counts["backward"] = {"up_grad": 1, "reduce_partials": 1, "norm_grad": any_stats, "dx": 1}
        return counts, convs
    p_stats = int(_norm_epilogue(project.conv, project.norm)[3])
    # Every branch of the head workloads goes per tap (bins <= 6 on a 64x64 map: k^2 P maps at the level stay
    # below one full-size map, csrc/projection.h): one 1x1 convolution to k^2 P channels each.
    counts[fwd].update(epilogue_up=B + p_stats, project_accumulate=1, stats_partial=any_stats + p_stats,
                       merge_stats=any_stats + p_stats)
    # and conv(x, W_x) and the per-tap maps' 1x1 convolutions (their backward likewise)
    for stage, conv in convs.items():
        conv[next(iter(conv))] += x_part + B
    if mode == "train":
        counts["backward"] = {"up_grad": 1 + B, "reduce_partials": 1 + B, "norm_grad": p_stats + S,
                              "project_adjoint": 1, "merge_stats": S, "epilogue_up": B, "dx": 1}
    return counts, convs


def test_every_workload_mode_and_dtype_is_planned_with_the_documented_launches(survey):
    seen = {(r["workload"], r["mode"], r["dtype"]) for r in survey}
    assert seen == {(w, m, d) for w in WORKLOADS for m in ("inference", "train") for d in ("float32", "bfloat16")}
    for r in survey:
        want, convs = documented_counts(r["workload"], r["mode"])
        # pool_levels and levels are the one levels pass (which one: where the pooling kernel's blocks fill the GPU)
        got = {stage: {("levels" if k == "pool_levels" else k): v for k, v in kernels.items()}
               for stage, kernels in r["counts"].items()}
        want = {stage: {k: v for k, v in kernels.items() if v} for stage, kernels in want.items()}
        assert got == want, (r["workload"], r["mode"], r["dtype"])
        got_convs = {stage: {k: v for k, v in ops.items() if k.startswith("aten.convolution")}
                     for stage, ops in r["library_counts"].items()}
        assert {stage: ops for stage, ops in got_convs.items() if ops} == convs, (r["workload"], r["mode"])
        # the launches move at least what the call must: x read, the output written (the bytes floor)
        w = WORKLOADS[r["workload"]]
        floor = count_work(w, w.n, r["mode"], getattr(torch, r["dtype"])).bytes
        assert r["est_us"] * 1e-6 >= floor / 3350e9 * 0.999, r


def test_no_launch_leaves_the_gpu_idle_behind_long_programs(survey):
    flagged = [(r["workload"], r["mode"], r["dtype"], f) for r in survey for f in r["flagged"]]
    assert not flagged, "\n".join(map(str, flagged))


def test_the_rule_flags_a_long_reduction_on_few_blocks():
    """Outside the workloads: batch statistics of one channel over a large map take at most kMaxChunks = 64
    (channel, chunk) blocks, each looping over 1/64 of the map (a known limit, docs/BACKENDS.md): the plan says
    so, and says which launch."""
    import msfused

    with torch.device("meta"):
        module = msfused.MultiScaleBlock(1, branch_channels=1, scales=(1,), kernel_size=1, norm="batch")
    plan = cuda_plan.plan_block(module, (64, 1, 512, 512), torch.float32, "train")
    flagged = {lc.kernel: lc for lc in plan.launches if lc.flagged}
    assert set(flagged) == {"stats_partial"}, sorted(flagged)
    part = flagged["stats_partial"].parts[0]
    assert part.programs == 64 < MIN_WAVES * 132 and part.serial > SERIAL_LIMIT, part


def test_recording_launches_nothing():
    """With the recorder on, the launchers record and return: the emulation build's outputs start as NaN and
    stay NaN (x's slice of the output too: the levels pass did not run); off again, the same call writes them."""
    cuda_plan.emulation_library()
    ops = torch.ops.msfused_cuda_emulation
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    weight = [torch.randn(2, 3, 1, 1, dtype=torch.float64) for _ in range(2)]
    args = (x, weight, [None, None], [None, None], [None, None], [True, True], [1e-5, 1e-5], [0, 0], [1, 1, 2, 2],
            "avg", "bilinear", False, "relu", "first")
    ops.start_recording(132)
    try:
        out, level, _pre, mean, _var = ops.multi_scale_forward(*args)
    finally:
        records = json.loads(ops.stop_recording())
    kernels = [r["kernel"] for r in records if r["grid"]]
    assert kernels == ["levels", "stats_partial", "merge_stats", "epilogue_up"], kernels
    assert out.isnan().all() and all(t.isnan().all() for t in level) and all(t.isnan().all() for t in mean)
    out, level, _pre, mean, _var = ops.multi_scale_forward(*args)
    assert not out.isnan().any() and not any(t.isnan().any() for t in level + mean)
    assert json.loads(ops.stop_recording()) == []  # nothing recorded with the recorder off


def test_explain_command():
    from msfused.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["explain", "psp_head_mmseg", "--backend", "cuda", "--mode", "train", "--dtype", "bfloat16", "--json"])
    assert rc == 0
    plan = json.loads(out.getvalue())
    assert "estimate" in plan["note"] and plan["omitted"] == []
    kernels = {lc["kernel"] for lc in plan["launches"]}
    assert {"pool_levels", "project_accumulate", "project_adjoint", "up_grad", "dx", "aten.convolution",
            "aten.convolution_backward"} <= kernels
    assert plan["launch_count"] == len(plan["launches"])
    assert plan["est_us"] == pytest.approx(sum(lc["est_us"] for lc in plan["launches"]))
    for lc in plan["launches"]:
        assert lc["programs"] == sum(p["programs"] for p in lc["parts"])
        if not lc["library"]:  # a kernel of the .cu (a library's grid is its own: not modelled)
            assert lc["programs"] > 0 and lc["block"]["threads"] == 256 and lc["serial"] >= 1 and lc["lanes"] >= 1
            assert lc["read"] > 0 and lc["written"] > 0
    convs = [lc for lc in plan["launches"] if lc["library"] == "cuDNN"]
    assert convs and all(lc["flops"] > 0 and lc["dot"] in ("half", "tf32") for lc in convs)
    # the per-tap maps (and their convolutions) are float32 for bfloat16 blocks: TF32
    assert {lc["dot"] for lc in convs} == {"half", "tf32"}


def test_explain_without_the_cuda_headers_says_what_it_needs(monkeypatch, capsys):
    from msfused.__main__ import main

    monkeypatch.setattr(cuda_plan, "_LOADED", {})  # not built yet in this process
    monkeypatch.setattr(cuda_plan, "cuda_include", lambda: None)
    assert main(["explain", "psp_small", "--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA toolkit's headers" in err and "emulation build" in err
