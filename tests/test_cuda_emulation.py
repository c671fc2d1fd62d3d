"""The CUDA backend's kernels and binding, run on the CPU: csrc/cuda/multi_scale_kernels.cu and
multi_scale_cuda.cpp compiled with the host compiler and -DMSFUSED_CUDA_EMULATION (csrc/cuda/emulation.h:
blocks in order, a block's threads as fibers, __syncthreads as a switch between them), registered as the
operators torch.ops.msfused_cuda_emulation.*, and compared with the CPU kernels (torch.ops.msfused.*) on the
same inputs: every forward output (out, level, pre, mean, var) and every backward gradient; the same for the
block with its projection (multi_scale_project_forward / _backward: also the projection's pre-activation,
statistics and parameter gradients, against float64). Outputs start as
NaN in this build, so an element the kernels forget to write fails the comparison.

This checks the kernels' index math, chunked reductions and the binding's logic (its ATen convolutions run on
CPU tensors here) without a GPU; it does not check the hardware's behaviour (memory model, speed) —
test_cuda_backend.py does that where a GPU is.
Needs the CUDA toolkit's headers (cuda_runtime_api.h, cuda_fp16.h) and the CPU extension msfused._C; the
library is built by msfused.cuda_plan.emulation_library (shared with the launch plan, tests/test_cuda_plan.py).
Runs in a subprocess: a fault in an emulated kernel ends the driver, not the test session, and a sanitized build
needs its runtime preloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import msfused
from msfused import _ops, cuda_plan

ROOT = Path(__file__).resolve().parents[1]


CUDA_INCLUDE = cuda_plan.cuda_include()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CUDA_INCLUDE is None, reason="the CUDA toolkit's headers (cuda_runtime_api.h) are not found"),
    pytest.mark.skipif(not _ops.has_kernel("CPU"), reason="msfused._C (the CPU kernels, the reference here) is not built"),
]


#: MSFUSED_EMULATION_SANITIZE=address (opt-in, not in CI: ~2x slower): the driver runs a build compiled with
#: AddressSanitizer, so that an out-of-bounds access of a kernel (shared memory: static arrays or one heap
#: buffer in this build; any tensor) fails the test with ASan's report, even where the values come out right.
SANITIZE = os.environ.get("MSFUSED_EMULATION_SANITIZE") or None


def _sanitizer_env(env: dict) -> dict:
    if SANITIZE is None:
        return env
    return dict(env, LD_PRELOAD=cuda_plan.sanitizer_preload(SANITIZE), ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")


@pytest.fixture(scope="module")
def emulation_library() -> Path:
    """The emulation build (msfused/cuda_plan.py: built once with ninja into its cache, rebuilt where the
    sources changed), loaded here too; the driver below loads it in its own process. A sanitized build is
    built and loaded in a process of its own (its runtime preloaded)."""
    if SANITIZE is None:
        return cuda_plan.emulation_library()
    code = f"from msfused import cuda_plan; print(cuda_plan.emulation_library(sanitize={SANITIZE!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                       env=_sanitizer_env(dict(os.environ, PYTHONPATH=str(ROOT))))
    assert r.returncode == 0, r.stderr[-4000:]
    return Path(r.stdout.strip().splitlines()[-1])


DRIVER = textwrap.dedent(
    r"""
    import functools, math, sys
    import torch
    import msfused  # noqa: F401  (loads msfused._C: the CPU kernels)
    from msfused import _ops

    from tests.conftest import TOL, norm_err  # SPEC.md's metric and tolerances

    torch.ops.load_library(sys.argv[1])
    emu, cpu = torch.ops.msfused_cuda_emulation, torch.ops.msfused
    torch.manual_seed(int(sys.argv[2]))

    # SPEC.md against the float64 reference: float64 err <= 1e-10; float32 err <= 1e-5 or, where the value is
    # ill-conditioned in float32 (a cancelling sum), no worse than the CPU kernels in float32 on the same values
    # (conftest.Checker's rule: 4 x theirs + 1e-5); float16 / bfloat16: 2 x theirs + 1e-3.
    def within_spec(e, e_own, dtype):
        if dtype in TOL:
            return e <= TOL[dtype] or (dtype == torch.float32 and e <= 4 * e_own + TOL[dtype])
        return e <= 2 * e_own + 1e-3

    def f64(ts):
        return [None if t is None else t.double() for t in ts]

    def as_list(t):
        return list(t) if isinstance(t, (list, tuple)) else [t]

    def compare_outputs(name, dtype, worst, direction, names, got, want, ref, s=None, skip=(), sums=None):
        # Each named output (a tensor or a list of them) of the emulated operator (got) and the CPU one (want)
        # against the float64 reference: same dtype, shape and memory format, then SPEC's rule; the errors
        # go to worst. With sums (a dict), the errors are added there and judged on their means over draws
        # (judged_on_means) instead.
        for nm, g_, w_, r_ in zip(names, got, want, ref):
            for j, (g, w, r) in enumerate(zip(as_list(g_), as_list(w_), as_list(r_))):
                assert g.dtype == w.dtype and g.shape == w.shape, (name, nm, j, g.dtype, w.dtype, g.shape, w.shape)
                if g.numel() and g.dim() == 4:
                    assert g.is_contiguous(memory_format=torch.channels_last) == \
                        w.is_contiguous(memory_format=torch.channels_last), (name, nm, j, "format")
                if nm in skip or not g.numel():
                    continue
                e, e_own = norm_err(g, r, s), norm_err(w, r, s)
                worst.append((e, f"{nm}[{j}]"))
                if sums is not None:
                    acc = sums.setdefault(f"{direction} {nm}[{j}]", [0.0, 0.0])
                    acc[0] += e
                    acc[1] += e_own
                    continue
                assert within_spec(e, e_own, dtype), (
                    f"{name}: {direction} {nm}[{j}] err {e:.3g} against float64 (the CPU kernels in {dtype}: "
                    f"{e_own:.3g})")

    def block_args(shape, factors, bins, k, cb, dtype, cl, bias=True, scale=True):
        # x, the branches' weight, bias, scale, shift (drawn), and the factor and bins lists.
        N, C, H, W = shape
        B = len(factors) + len(bins)
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        ks = k if isinstance(k, (list, tuple)) else [k] * B
        cbs = cb if isinstance(cb, (list, tuple)) else [cb] * B
        weight = [(torch.randn(cbs[b], C, ks[b], ks[b], dtype=torch.float64) / math.sqrt(C * ks[b] ** 2)).to(dtype)
                  for b in range(B)]
        bias_ = [(torch.randn(cbs[b], dtype=torch.float64) * 0.3).to(dtype) if bias else None for b in range(B)]
        pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        scale_ = [(torch.rand(cbs[b], dtype=torch.float64) + 0.5).to(pdt) if scale else None for b in range(B)]
        shift_ = [(torch.randn(cbs[b], dtype=torch.float64) * 0.2).to(pdt) if scale else None for b in range(B)]
        factor = list(factors) + [0] * len(bins)
        binl = [0, 0] * len(factors)
        for bn in bins:
            binl += list(bn) if isinstance(bn, tuple) else [bn, bn]
        return x, weight, bias_, scale_, shift_, factor, binl

    def judged_on_means(name, dtype, draw):
        # draw(sums): one draw of a case, its errors added to sums (compare_outputs). float32 values that are
        # cancelling sums (a norm parameter's gradient near 0 on a draw; a coarse level's gradients under the
        # projection's batch statistics, which remove most of its nearly constant part) are heavy-tailed noise in
        # one draw, and the CPU kernels' error on that draw is no gauge: the CUDA kernels round each level
        # gradient to float32 as the naive composition does, the CPU kernels sum in double (seen: grad_shift
        # 1.65e-5 against 4.5e-7, an absolute error of 3.5e-8 of the upstream gradient's norm; grad_scale 1.2e-5
        # against 4.6e-7). A float32 case over SPEC's rule on its draw is drawn twice more and judged on the
        # mean errors of the three; other dtypes, and passing cases, on their one draw.
        if dtype != torch.float32:
            return draw(None)
        sums = {}
        draw(sums)
        if all(within_spec(e, e_own, dtype) for e, e_own in sums.values()):
            return
        for _ in range(2):
            draw(sums)
        for what, (e, e_own) in sums.items():
            assert within_spec(e / 3, e_own / 3, dtype), (
                f"{name}: {what} mean err {e / 3:.3g} over 3 draws against float64 (the CPU kernels in {dtype}: "
                f"{e_own / 3:.3g})")
        print(f"ok {name}: on the mean of 3 draws", flush=True)

    def case(name, shape, dtype=torch.float64, **kw):
        # The block: the emulated CUDA operators against the CPU ones and float64 (one_case), judged_on_means.
        judged_on_means(name, dtype, lambda sums: one_case(name, shape, dtype=dtype, sums=sums, **kw))

    def one_case(name, shape, factors=(), bins=(), k=3, cb=3, dtype=torch.float64, cl=False, down="avg",
                 up="bilinear", ac=False, act="relu", pos="first", stats=False, bias=True, scale=True, sums=None):
        x, weight, bias_, scale_, shift_, factor, binl = block_args(shape, factors, bins, k, cb, dtype, cl, bias, scale)
        B = len(weight)
        config = ([stats] * B, [1e-5] * B, factor, binl, down, up, ac, act, pos)
        args = (x, weight, bias_, scale_, shift_) + config
        want = cpu.multi_scale_forward(*args)
        got = emu.multi_scale_forward(*args)
        # The float64 reference: the CPU kernels in float64 on the same values.
        ref = cpu.multi_scale_forward(x.double(), f64(weight), f64(bias_), f64(scale_), f64(shift_), *config)
        worst = []
        compare = functools.partial(compare_outputs, name, dtype, worst, sums=sums)
        compare("forward", ["out", "level", "pre", "mean", "var"], got, want, ref)
        # Backward on identical saved tensors (the CPU forward's; the reference's own in float64).
        grad = torch.randn(want[0].shape, dtype=torch.float64).to(dtype)
        bargs = (grad, x, weight, scale_, shift_) + tuple(want[1:]) + config + ([True, True],)
        bw = cpu.multi_scale_backward(*bargs)
        bg = emu.multi_scale_backward(*bargs)
        bref = cpu.multi_scale_backward(grad.double(), x.double(), f64(weight), f64(scale_), f64(shift_), *ref[1:],
                                        *config, [True, True])
        # grad_bias before a batch-statistics norm: its true value is 0, all three are rounding noise (checked
        # against a rounding bound in test_forward_backward.py: conftest.ZeroGradProbe).
        compare("backward", ["grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift"], bg, bw, bref,
                s=grad.double().norm().item(), skip=("grad_bias",) if stats else ())
        # Determinism: the same call twice gives bit-identical results.
        again = emu.multi_scale_backward(*bargs)
        assert torch.equal(again[0], bg[0]) and all(torch.equal(a, b) for a, b in zip(again[1], bg[1])), name
        e, where = max(worst)
        print(f"ok {name}: worst err {e:.2e} ({where})", flush=True)

    def project_case(name, shape, dtype=torch.float64, **kw):
        # The block with its projection (one_project_case), judged_on_means.
        judged_on_means(name, dtype, lambda sums: one_project_case(name, shape, dtype=dtype, sums=sums, **kw))

    def one_project_case(name, shape, factors=(), bins=(), k=3, cb=3, P=4, pk=3, dtype=torch.float64, cl=False,
                         down="avg", up="bilinear", ac=False, act="relu", pos="first", stats=False, pstats=False,
                         pnorm=True, pbias=True, pact="relu", masks=([True, True],), sums=None, rounded_once=False):
        # One draw of the block with its projection: the emulated CUDA operators against the CPU ones and
        # float64 (sums: compare_outputs's). rounded_once (half precision, no x part): the projection's
        # pre-activation is the CPU backend's, every part summed in float32 and rounded once, but for the rare
        # sum the two summation orders leave on either side of a rounding boundary.
        x, weight, bias_, scale_, shift_, factor, binl = block_args(shape, factors, bins, k, cb, dtype, cl)
        B, C = len(weight), shape[1]
        pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        c_out = B * cb + (C if pos != "none" else 0)
        pw = (torch.randn(P, c_out, pk, pk, dtype=torch.float64) / math.sqrt(c_out * pk * pk)).to(dtype)
        pb = (torch.randn(P, dtype=torch.float64) * 0.3).to(dtype) if pbias else None
        ps = (torch.rand(P, dtype=torch.float64) + 0.5).to(pdt) if pnorm else None
        pt = (torch.randn(P, dtype=torch.float64) * 0.2).to(pdt) if pnorm else None
        config = ([stats] * B, [1e-5] * B, factor, binl, down, up, ac, act, pos)
        pconf = (pstats, 1e-5, pact)

        def fwd(op, x, weight, bias_, scale_, shift_, pw, pb, ps, pt, save_pre=True, parts=()):
            return op.multi_scale_project_forward(x, weight, bias_, scale_, shift_, *config, pw, pb, ps, pt, *pconf,
                                                  save_pre, list(parts))

        def parts_of(pw):
            # project_parts as msfused.functional passes them (from its parameter cache) to an inference call
            N, C, H, W = x.shape
            offset, branches = (C if pos == "first" else 0), []
            for b, w_ in enumerate(weight):
                level = (H // factor[b], W // factor[b]) if factor[b] else (binl[2 * b], binl[2 * b + 1])
                branches.append((offset, w_.shape[0], level, factor[b] == 1))
                offset += w_.shape[0]
            return _ops.project_parts(pw, C, {"first": 0, "last": offset}.get(pos, -1), branches, H, W)

        worst = []
        compare = functools.partial(compare_outputs, name, dtype, worst, sums=sums)

        want = fwd(cpu, x, weight, bias_, scale_, shift_, pw, pb, ps, pt)
        got = fwd(emu, x, weight, bias_, scale_, shift_, pw, pb, ps, pt)
        ref = fwd(cpu, x.double(), f64(weight), f64(bias_), f64(scale_), f64(shift_), pw.double(),
                  *f64([pb, ps, pt]))
        names = ["out", "level", "pre", "mean", "var", "project_pre", "project_mean", "project_var"]
        compare("forward", names, got, want, ref)
        if rounded_once:
            miss = (got[5] != want[5]).double().mean().item()
            assert miss <= 0.01, (name, "project_pre rounded once", miss)
        lean = fwd(emu, x, weight, bias_, scale_, shift_, pw, pb, ps, pt, save_pre=False)
        assert lean[5].numel() == 0 and torch.equal(lean[0], got[0]), (name, "save_pre=False")
        # the weight's parts given (as the functional layer's cache gives them): the same output, bit for bit
        given = fwd(emu, x, weight, bias_, scale_, shift_, pw, pb, ps, pt, save_pre=False, parts=parts_of(pw))
        assert torch.equal(given[0], got[0]), (name, "project_parts")
        grad = torch.randn(want[0].shape, dtype=torch.float64).to(dtype)
        gnames = ["grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift", "grad_project_weight",
                  "grad_project_bias", "grad_project_scale", "grad_project_shift"]

        def bwd(op, grad, x, weight, scale_, shift_, saved, pw, ps, pt, mask):
            return op.multi_scale_project_backward(grad, x, weight, scale_, shift_, *saved[1:5], *config, pw, ps, pt,
                                                   *saved[5:8], *pconf, mask)

        # Bias gradients before a batch-statistics norm: true value 0, rounding noise only (as above).
        skip = (("grad_bias",) if stats or pstats else ()) + (("grad_project_bias",) if pstats else ())
        bref = bwd(cpu, grad.double(), x.double(), f64(weight), f64(scale_), f64(shift_), ref, pw.double(),
                   *f64([ps, pt]), [True, True])
        for mask in masks:
            bargs = (grad, x, weight, scale_, shift_, want, pw, ps, pt, mask)
            bg, bw = bwd(emu, *bargs), bwd(cpu, *bargs)
            compare(f"backward {mask}", gnames, bg, bw, bref, s=grad.double().norm().item(), skip=skip)
        again = bwd(emu, *bargs)
        assert all(torch.equal(a, b) for a_, b_ in zip(again, bg) for a, b in zip(as_list(a_), as_list(b_))), name
        e, where = max(worst)
        print(f"ok {name}: worst err {e:.2e} ({where})", flush=True)

    def naive_project_case(name, kind, C, shape, dtype, cl=False, draws=3, **kw):
        # SPEC.md's half-precision rule as the GPU check applies it (msfused.bench.gpu_check): the emulated CUDA
        # operators' gradients against float64 no worse than twice the naive module's own in the same dtype,
        # plus 1e-3, averaged over draws. (project_case compares with the CPU kernels, which share this
        # algorithm: a rounding both add is invisible there.) Smooth activations: under ReLU a few mask flips by
        # rounding dominate the gradients' errors, and the comparison would be of noise.
        import copy
        from msfused.bench.accuracy import spec_limit
        from msfused.bench.workloads import _randomise
        from msfused.functional import _branch_args, _norm_epilogue
        cls = msfused.NaiveMultiScaleBlock if kind == "ms" else msfused.NaivePyramidPooling
        ref = cls(C, **kw).eval()
        _randomise(ref, torch.Generator().manual_seed(int(torch.randint(2**31, ()))))
        ref = ref.double()
        own = copy.deepcopy(ref).to(dtype)
        spec, proj = own.spec, own.project
        names = ["x"] + [n for n, _ in own.named_parameters()]
        sums = {}
        for _ in range(draws):
            x = torch.randn(shape, dtype=torch.float64).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
            x64 = x.detach().double().requires_grad_(True)
            out_own = own(xs[0])
            g = torch.randn(out_own.shape, dtype=torch.float64).to(dtype)
            want = dict(zip(names, torch.autograd.grad(out_own, [xs[0]] + list(own.parameters()), g)))
            out_ref = ref(x64)
            exact = dict(zip(names, torch.autograd.grad(out_ref, [x64] + list(ref.parameters()), g.double())))
            weight, bias_, scale_, shift_, stats_, eps_ = _branch_args(x, spec, own.branches)
            pb, ps, pt, pst, peps = _norm_epilogue(proj.conv, proj.norm)
            conf = (stats_, eps_, *spec.op_args().values())
            pconf = (pst, peps, *spec.project.op_args().values())
            f = emu.multi_scale_project_forward(x, weight, bias_, scale_, shift_, *conf, proj.conv.weight,
                                                pb, ps, pt, *pconf, True, [])
            b = emu.multi_scale_project_backward(g, x, weight, scale_, shift_, *f[1:5], *conf, proj.conv.weight, ps,
                                                 pt, *f[5:8], *pconf, [True, True])
            got = {"x": b[0], "project.conv.weight": b[5], "project.conv.bias": b[6]}
            for i, br in enumerate(own.branches):
                got[f"branches.{i}.conv.weight"] = b[1][i]
                if br.conv.bias is not None:
                    got[f"branches.{i}.conv.bias"] = b[2][i]
            # The norm's weight and bias through its fold into bias, scale and shift, as autograd takes them.
            nw = torch.autograd.grad([ps, pt], [proj.norm.weight, proj.norm.bias], [b[7], b[8]])
            got.update({"project.norm.weight": nw[0], "project.norm.bias": nw[1]})
            assert set(got) == set(names), (name, sorted(set(names) - set(got)))
            s = g.double().norm().item()
            for nm in names:
                acc = sums.setdefault(nm, [0.0, 0.0])
                acc[0] += norm_err(got[nm], exact[nm], s) / draws
                acc[1] += norm_err(want[nm], exact[nm], s) / draws
        worst = []
        for nm, (e, e_own) in sums.items():
            worst.append((e / spec_limit(dtype, e_own), f"{nm} err {e:.2e} (naive {e_own:.2e})"))
            assert e <= spec_limit(dtype, e_own), f"{name}: grad {nm} err {e:.3g} against float64 (naive in {dtype}: {e_own:.3g})"
        print(f"ok {name}: worst {max(worst)[1]}", flush=True)

    which = sys.argv[3]
    if which == "project":
        # factor 1 and 2 convolved directly (k = 3 over a level close to full size), factor 4 per tap
        project_case("proj-ms124-k3-eval-f64", (2, 3, 11, 9), factors=(1, 2, 4), pact="gelu",
                     masks=([False, True], [True, False], [True, True]))
        project_case("proj-psp1236-k1-train-cl-f32-last", (4, 3, 10, 9), bins=(1, 2, 3, 6), k=1, pk=1, P=5,
                     dtype=torch.float32, cl=True, pos="last", stats=True, pstats=True, pbias=False, pact="silu")
        project_case("proj-psp13-nearest-nonorm-cl", (2, 4, 8, 7), bins=(1, (3, 2)), up="nearest", act="gelu",
                     pnorm=False, pact="none", cl=True, pos="last")
        project_case("proj-ms23-bilinear-ac-train-none", (3, 2, 12, 13), factors=(2, 3), down="bilinear", ac=True,
                     stats=True, pstats=True, pbias=False, pos="none", k=1)
        project_case("proj-psp12-bf16", (2, 4, 9, 9), bins=(1, 2), pk=3, dtype=torch.bfloat16)
        # bfloat16 against the naive module's own error: per-tap branches (the GPU check's c03 with GELU)
        naive_project_case("proj-psp-bf16-against-naive", "psp", 4, (4, 4, 15, 27), torch.bfloat16, cl=True,
                           branch_channels=2, bins=(3, 2, (2, 3), 6), kernel_size=3, up_mode="bilinear",
                           align_corners=True, bias=False, norm=None, activation="gelu", input_position=None,
                           project=dict(out_channels=6, kernel_size=3, bias=True, norm="batch", activation="gelu"))
        project_case("proj-psp12-f16-k5-train", (4, 4, 9, 9), bins=(1, 2), pk=5, dtype=torch.float16, pstats=True,
                     pbias=False)
        # bin 1 on a larger map: the adjoint's readers split over many lanes; the statistics over chunks
        project_case("proj-psp12-large-map-lanes", (2, 2, 40, 33), bins=(1, 2), k=1, pk=3, P=3,
                     dtype=torch.float32, pstats=True, pbias=False)
        # a wide map: the adjoint's reader tables past what this build gives them (the path without them)
        project_case("proj-psp-wide-map-no-tables", (1, 2, 3, 700), bins=(1, (1, 2)), k=1, pk=3, P=2)
        # more than kMaxBranches per-tap branches: two accumulation launches, two adjoint groups
        project_case("proj-nine-branches", (2, 2, 9, 8), bins=(1, 2, 1, 2, 1, 2, 1, 2, 1), k=1, cb=2, P=2, pk=3,
                     pos="none")
        # and in bfloat16: the sum carried between the launches in float32, rounded once
        project_case("proj-nine-branches-bf16", (2, 3, 9, 8), bins=(1, 2, 1, 2, 1, 2, 1, 2, 1), k=1, cb=2, P=5,
                     pk=3, pos="none", dtype=torch.bfloat16, pnorm=False, pact="none", rounded_once=True)
    elif which == "factor":
        case("ms124-avg-f64", (2, 3, 9, 11), factors=(1, 2, 4))
        case("ms123-bilinear-ac-nearest-k1-gelu-last-stats", (3, 4, 10, 13), factors=(1, 2, 3), down="bilinear",
             up="nearest", ac=True, k=1, act="gelu", pos="last", stats=True)
        case("ms23-nearest-k5-silu-none-cl-f32", (2, 3, 11, 8), factors=(2, 3), down="nearest", k=5, act="silu",
             pos="none", dtype=torch.float32, cl=True, bias=False)
        case("ms12-k7-chunks", (2, 10, 34, 33), factors=(1, 2), k=(7, 3), cb=(10, 9), act="none",
             scale=False)
        case("ms13-k9-cl", (2, 3, 19, 14), factors=(1, 3), k=9, cl=True, stats=True)  # any k: ATen's convolution
        case("ms124-stats-cl-f64", (2, 5, 20, 17), factors=(1, 2, 4), stats=True, cl=True, ac=True, pos="last")
        case("ms14-f16", (2, 4, 12, 12), factors=(1, 4), dtype=torch.float16)
        # dx's tap tables: bilinear down with align_corners (the last row's two taps on one x row), channels_last,
        # odd sizes, the int indexing (at most 4096 elements in this build) and the int64 one
        case("ms124-bilinear-ac-cl-dx-tables", (2, 3, 17, 5), factors=(1, 2, 4), down="bilinear", ac=True, k=1,
             cl=True, dtype=torch.float32)
        case("ms13-nearest-dx-int64", (3, 7, 23, 15), factors=(1, 3), down="nearest", k=1, pos="last")
        case("ms12-bf16-stats", (4, 4, 10, 10), factors=(1, 2), dtype=torch.bfloat16, stats=True)
        case("nine-branches", (2, 2, 12, 12), factors=(1, 2, 3, 4, 1, 2, 3, 4, 6), k=1, cb=2, stats=True)
        # levels' one-thread pooling windows (at least 1024 level elements here, else the windows go over
        # lanes) read in 2 x 2 tiles: 2 x 2 (one tile) and 3 x 3 windows (partial tiles) in channels_last
        case("ms23-avg-tiles-cl-bf16", (2, 3, 40, 44), factors=(2, 3), k=1, cl=True, dtype=torch.bfloat16)
        # x's copy in 16-byte chunks (runs and their stride multiples of 8 bfloat16): channels_last (runs of C = 8
        # channels, out's 16 channels apart) and NCHW (one run per n), into the last slice
        case("ms12-copy-chunks-cl-bf16", (2, 8, 6, 5), factors=(1, 2), k=1, cb=4, cl=True, dtype=torch.bfloat16,
             pos="last")
        case("ms12-copy-chunks-bf16", (2, 4, 8, 6), factors=(1, 2), k=1, cb=4, dtype=torch.bfloat16, pos="last")
        # Image pooling as autograd runs its backward (msfused._ops.pooled_only): the block on the 1x1 level
        case("image-pool-on-1x1", (3, 5, 1, 1), bins=(1, 1), k=(3, 1), cb=(4, 2), pos="none", stats=True)
        case("image-pool-on-1x1-cl-f32", (2, 6, 1, 1), bins=(1,), k=1, pos="none", cl=True, dtype=torch.float32,
             act="silu")
        # torch.use_deterministic_algorithms: the weight gradient takes ATen's convolution backward
        # (cuBLAS is refused in that mode on a GPU without CUBLAS_WORKSPACE_CONFIG)
        torch.use_deterministic_algorithms(True)
        try:
            case("ms12-deterministic-mode-cl-f32", (2, 3, 11, 10), factors=(1, 2), k=(3, 5), dtype=torch.float32,
                 cl=True, stats=True)
        finally:
            torch.use_deterministic_algorithms(False)
        # The convolutions ask cuDNN for deterministic algorithms in a scope: the user's flag is restored.
        for flag in (False, True):
            torch.backends.cudnn.deterministic = flag
            case(f"cudnn-deterministic-flag-{flag}", (2, 2, 8, 8), factors=(1, 2), k=1)
            assert torch.backends.cudnn.deterministic is flag
        torch.backends.cudnn.deterministic = False
        # x without channels: refused with a clear error (its gradients would be miscomputed)
        try:
            emu.multi_scale_forward(torch.randn(2, 0, 8, 8, dtype=torch.float64),
                                    [torch.randn(2, 0, 3, 3, dtype=torch.float64)], [torch.randn(2, dtype=torch.float64)],
                                    [None], [None], [False], [1e-5], [1], [0, 0], "avg", "bilinear", False, "relu",
                                    "first")
        except ValueError as e:
            assert "no channels" in str(e), e
        else:
            raise AssertionError("x without channels was not refused")
        print("ok refuses x without channels", flush=True)
    elif which == "random":  # configurations drawn from the seed
        import random
        rnd = random.Random(int(sys.argv[2]))
        for i in range(10):
            shape = (rnd.randint(1, 3), rnd.randint(1, 10), rnd.randint(6, 36), rnd.randint(6, 36))
            kw = dict(k=rnd.choice((1, 3, 5, 7)), cb=rnd.randint(1, 10), up=rnd.choice(("bilinear", "nearest")),
                      ac=rnd.random() < 0.5, act=rnd.choice(("relu", "silu", "gelu", "none")),
                      pos=rnd.choice(("first", "last", "none")), stats=rnd.random() < 0.4,
                      bias=rnd.random() < 0.5, scale=rnd.random() < 0.7, cl=rnd.random() < 0.4,
                      dtype=rnd.choice((torch.float64, torch.float64, torch.float32)))
            if kw["stats"]:
                shape = (max(shape[0], 2),) + shape[1:]
            if rnd.random() < 0.5:
                fs = sorted(rnd.sample((1, 2, 3, 4, 5), rnd.randint(1, 3)))
                fs = [f for f in fs if f <= min(shape[2:])] or [1]
                kw.update(factors=tuple(fs), down=rnd.choice(("avg", "bilinear", "nearest")))
            else:
                kw.update(bins=tuple(rnd.choice((1, 2, 3, 6, (2, 5), (7, 3), 9)) for _ in range(rnd.randint(1, 4))))
            if kw["stats"]:
                areas = [(shape[2] // f) * (shape[3] // f) for f in kw.get("factors", ())]
                areas += [(b if isinstance(b, int) else b[0]) * (b if isinstance(b, int) else b[1])
                          for b in kw.get("bins", ())]
                if kw["dtype"] != torch.float64:
                    # float32 batch statistics over few values per channel are ill-conditioned (conftest.Case):
                    # at least 16 values per channel, so that both implementations are well above rounding noise.
                    shape = (max(shape[0], -(-16 // min(areas))),) + shape[1:]
                if shape[1] == 1 and (kw["k"] == 1 or min(areas) == 1):
                    # One input value per conv output (k = 1, or any k over a 1x1 level: one tap reads data) before
                    # batch statistics: the norm cancels the weight's scale but for its eps, so the weight's true
                    # gradient nearly cancels and rounding dominates it, in float64 too (seed 3071 drew a float64
                    # err of 1.08e-10). The module tests check that case against its rounding bound
                    # (conftest.ZeroGradProbe's scalar weights); here C = 2.
                    shape = (shape[0], 2) + shape[2:]
            case(f"random{i}-{shape}-{kw}", shape, **kw)
    else:
        case("psp1236-stats", (2, 5, 13, 11), bins=(1, 2, 3, 6), k=1, stats=True)
        case("psp-pairs-nearest-k3-f32", (2, 4, 9, 7), bins=((2, 5), (5, 2), 3), up="nearest", k=3,
             dtype=torch.float32, pos="last", act="silu")
        case("psp-larger-than-map", (3, 3, 5, 5), bins=((8, 6), 20, 1), ac=True, k=3, cl=True)
        # one-row and one-column maps (levels larger than the map on one axis), both memory orders
        case("psp-one-row-cl", (3, 5, 1, 7), bins=((1, 3), (2, 9)), k=1, cl=True, pos="last")
        case("psp-one-column", (2, 3, 13, 1), bins=(1, 3, (5, 2)), k=1)
        case("psp-too-big-for-pool-kernel-cl", (2, 3, 40, 40), bins=(40, 2), k=1, cl=True, stats=True)
        case("psp-mixed-with-factor", (2, 3, 12, 12), factors=(1, 2), bins=(1, 3), k=1, pos="none")
        case("psp-f16", (8, 8, 12, 12), bins=(1, 2, 3, 6), k=1, dtype=torch.float16, stats=True)
        # bin 1 and 2 on a larger map: the upsample adjoint of a level pixel split over many lanes, the
        # whole-map reductions over several chunks
        case("psp12-large-map-lanes-chunks", (3, 2, 70, 45), bins=(1, 2), k=1, stats=True, dtype=torch.float32)
        # dx's reader tables (H + W entries per branch) past the shared memory it gives them: per element
        case("psp-dx-tables-do-not-fit", (2, 2, 3, 3100), bins=(1, (1, 5)), k=1, pos="last")
        # bins as gathers (N * channel groups < 4): one-thread adaptive windows of 1 x 6 and 2 x 4 (several tiles
        # of columns, partial tiles), x copied into the last slice
        case("gather-bins-windows-in-tiles", (1, 8, 30, 36), bins=((30, 6), (15, 9)), k=1, pos="last")
        # pool_levels' tiles (csrc/cuda/multi_scale_kernels.cu, pool_tile): NCHW takes 4 channels x up to 64
        # columns per chunk, the rest of the block as row groups; channels_last 32 channels x up to 8 columns
        # (N * channel groups >= 4 here: the pooling kernel, not the gathers). W past the chunk (two chunks, a
        # channel group not full); W below it (row groups, more of them than rows); one-row and one-column
        # maps; bins past the map; no copy of x.
        case("pool-nchw-two-chunks-odd", (2, 7, 13, 70), bins=(1, 2, 3, 6), k=1, pos="last", dtype=torch.float32)
        case("pool-nchw-row-groups-bins-past-map", (2, 5, 9, 3), bins=(12, (1, 4)), k=1, pos="none")
        case("pool-nchw-one-column", (2, 6, 17, 1), bins=(1, (5, 2)), k=1)
        case("pool-nchw-one-row-bf16", (2, 5, 1, 23), bins=(1, 3), k=1, dtype=torch.bfloat16)
        case("pool-cl-three-chunks", (4, 3, 11, 20), bins=(1, 2, 6), k=1, cl=True, dtype=torch.float32)
        case("pool-cl-row-groups-bins-past-map", (4, 2, 3, 7), bins=((5, 9), 1), k=1, cl=True, pos="none")
    """
)


@pytest.mark.parametrize("which", ["factor", "bins", "random", "project"])
def test_emulated_cuda_matches_cpu(emulation_library, which, _seed_every_test):
    env = _sanitizer_env(dict(os.environ, PYTHONPATH=str(ROOT)))
    r = subprocess.run([sys.executable, "-c", DRIVER, str(emulation_library), str(_seed_every_test), which],
                       capture_output=True, text=True, timeout=1500, env=env, cwd=str(ROOT))
    # (a sanitizer's report is at the start of stderr, the Python traceback at its end)
    stderr = r.stderr[:4000] + "\n...\n" + r.stderr[-4000:] if len(r.stderr) > 8000 else r.stderr
    assert r.returncode == 0, f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{stderr}"
    assert r.stdout.count("ok ") >= 6, r.stdout
