"""The launch plan (msfused/triton/plan.py, ``python -m msfused explain``): every workload of WORKLOADS.md,
inference and training, float32 and bfloat16, every autotune configuration, planned at its full size
from the real launchers without a GPU; no launch may leave the GPU idle behind a few long programs
(fewer than 2 x 132 programs running a serial loop of more than 1,024 steps). Figures are estimates.

The plan needs the GPU kernels' launch parameters, which Triton's interpreter (on for the test session,
tests/conftest.py) replaces: it is computed in one process of its own with the interpreter off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every workload's plan, and one explain command's JSON, from one process with the interpreter off.
_SURVEY = """
import contextlib, io, json, sys
import torch
from msfused.__main__ import main
from msfused.bench.floor import count_work
from msfused.bench.workloads import WORKLOADS
from msfused.triton import plan
rows = plan.survey()
for r in rows:
    w = WORKLOADS[r["workload"]]
    work = count_work(w, w.n, r["mode"], getattr(torch, r["dtype"]))
    r["floor_bytes"], r["floor_flops"] = work.bytes, work.flops
explained = []
for argv in (["psp_small", "--mode", "train", "--dtype", "bfloat16"], ["psp_decoder_smp", "--mode", "train"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["explain", *argv, "--json"])
    explained.append((rc, out.getvalue()))
json.dump(dict(survey=rows, explain_rc=explained[0][0], explain=explained[0][1], head_rc=explained[1][0],
               head=explained[1][1]), sys.stdout)
"""

HEADS = ("psp_head_mmseg", "psp_decoder_smp")


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kw)


@pytest.fixture(scope="module")
def planned():
    proc = _run(["-c", _SURVEY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def survey(planned):
    return planned["survey"]


def test_every_workload_mode_and_dtype_is_planned(survey):
    from msfused.bench.workloads import WORKLOADS

    seen = {(r["workload"], r["mode"], r["dtype"]) for r in survey}
    assert seen == {(w, m, d) for w in WORKLOADS for m in ("inference", "train") for d in ("float32", "bfloat16")}
    for r in survey:
        # the forward's launch counts (README): factor pyramids 1, pyramid pooling 2 in inference; large blocks
        # (launch.SPLIT_OUTPUTS) 3, pyramid pooling 4 where its pooling is split; a head's Triton launches
        # (docs/BACKENDS.md, "With a projection"): the levels (1) and, where the pooling was split into pixel
        # chunks, their combine (a levels_kernel gather: heads have no factor levels), each branch's norm and
        # activation at its level (4), the accumulation pass (1)
        factors = WORKLOADS[r["workload"]].block == "multi_scale"
        if r["mode"] == "inference":
            if r["workload"] in HEADS:
                expected = 1 + ("levels_kernel" in r["triton_kernels"]) + 4 + 1
            elif "block_kernel" in r["triton_kernels"]:  # (pool, then) every branch from x or its level
                expected = 1 if factors else 2
            elif factors:  # a large block: the levels, convolutions, up-resize
                expected = 3
            else:  # a large pyramid pooling block: pool (and its chunks' combine), convolutions, up-resize
                expected = 3 + ("levels_kernel" in r["triton_kernels"])
            if r["workload"] not in HEADS:
                assert r["launches"] == r["triton_launches"], r  # a block's launchers run no ATen kernel
            assert r["triton_launches"] == expected, r
        # the kernels move at least what the call must: x read, the output written (the bytes floor)
        assert r["est_us"] * 1e-6 >= r["floor_bytes"] / 3350e9 * 0.999, r


def test_no_launch_leaves_the_gpu_idle_behind_long_programs(survey):
    flagged = [(r["workload"], r["mode"], r["dtype"], f) for r in survey for f in r["flagged"]]
    assert not flagged, "\n".join(map(str, flagged))


def test_explain_command(planned):
    assert planned["explain_rc"] == 0
    plan = json.loads(planned["explain"])
    assert "estimate" in plan["note"]
    kernels = {lc["kernel"] for lc in plan["launches"]}
    assert {"levels_kernel", "convs_kernel", "up_adjoints_kernel", "wgrad_kernel", "dx_kernel"} <= kernels
    chosen = [lc for lc in plan["launches"] if lc["chosen"]]
    assert len(chosen) == plan["launch_count"] and plan["est_us"] == pytest.approx(sum(lc["est_us"] for lc in chosen))
    for lc in plan["launches"]:
        assert lc["programs"] == sum(p["programs"] for p in lc["parts"]) > 0
        assert lc["serial"] >= 1 and lc["lanes"] >= 1 and lc["read"] > 0 and lc["written"] > 0


def test_the_head_plans_cover_the_projection(survey):
    """A head's plan (block + projection) is its whole call: the projection's Triton passes and its ATen
    convolutions (cuDNN on a GPU), whose FLOPs are exactly what WORKLOADS.md's floor counts (the branches'
    convolutions, the projection's x part at full resolution and the branches' parts at their levels; a
    training step 3 times the forward's), at the rate of the dtype: bfloat16 on tensor cores, float32 as
    TF32 (torch's default for cuDNN). Nothing is left out of any plan (plan.omitted)."""
    for r in survey:
        assert r["omitted"] == [], r["workload"]
        if r["workload"] not in HEADS:
            assert r["conv_launches"] == 0, r
            continue
        train = r["mode"] == "train"
        # the backward's norm and activation in Triton passes: per-tile sums, their fixed-order combine and,
        # with the projection's batch statistics (both heads train so), the gradient pass
        backward = {"adjoint_kernel", "gather_kernel", "act_grad_kernel", "column_sums_kernel", "norm_grad_kernel"}
        needed = {"pool_kernel", "project_epilogue_kernel"} | (backward if train else set())
        assert needed <= set(r["triton_kernels"]), r
        # forward: each branch's convolution and its part's, conv(x, W_x); backward: each one's backward
        assert r["conv_launches"] == (18 if train else 9), r
        assert r["conv_flops"] == r["floor_flops"] > 0, r
        # in bfloat16 the per-tap maps' 1x1 convolutions run in float32 (_ops.tap_maps_dtype; TF32 is exact on
        # bfloat16 operands), the others in bfloat16; both heads have per-tap branches
        assert r["conv_rates"] == (["half", "tf32"] if r["dtype"] == "bfloat16" else ["tf32"]), r


def test_explain_a_head(planned):
    """The JSON of a head's plan: its cuDNN convolutions and ATen kernels as launches of a library (grid not
    modelled: programs 0), the Triton launches as the block's."""
    assert planned["head_rc"] == 0
    plan = json.loads(planned["head"])
    assert plan["omitted"] == [] and "estimate" in plan["note"]
    chosen = [lc for lc in plan["launches"] if lc["chosen"]]
    assert plan["est_us"] == pytest.approx(sum(lc["est_us"] for lc in chosen))
    convs = [lc for lc in plan["launches"] if lc["library"] == "cuDNN"]
    assert {lc["kernel"] for lc in convs} == {"aten.convolution", "aten.convolution_backward"}
    assert all(lc["flops"] > 0 and lc["dot"] == "tf32" and lc["programs"] == 0 and lc["est_us"] > 0 for lc in convs)
    assert {lc["stage"] for lc in plan["launches"]} == {"forward", "backward"}
    for lc in plan["launches"]:
        if not lc["library"]:
            assert lc["programs"] == sum(p["programs"] for p in lc["parts"]) > 0 and lc["serial"] >= 1
