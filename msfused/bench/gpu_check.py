"""The GPU check's Python phases (``bench/gpu_check.sh`` runs them; ``--device cpu`` is the dry run CI does).

    python -m msfused.bench.gpu_check correctness --out DIR [--device cuda] [--configs 24] ...
    python -m msfused.bench.gpu_check speed --out DIR [--device cuda] ...

**correctness**: every fused backend of the device and ``'auto'`` on seeded random block configurations
(factor pyramids and bins, every down and up resize mode, k 1 and 3, no norm / BatchNorm in train and eval
mode, biases, activations and input positions varied), in float64, float32 (TF32 off) and bfloat16, NCHW
and channels_last: the output and every gradient (x, each parameter) and the running statistics against
the naive composition run in float64 on the same device, with SPEC.md's rules (:mod:`.accuracy`, the test
suite's): float64 1e-10, float32 1e-5 (ill-conditioned tensors: within 4x the naive module's own float32
error), bfloat16 within twice the naive module's own error plus 1e-3 (mean over 3 draws, 24 where 3 fail:
``HALF_DRAWS``), gradients whose true value is 0 within their rounding bound. Outputs are poisoned: Triton's
buffers start as NaN (``msfused.triton.launch.POISON``) and, on CUDA, the caching allocator's free blocks are
filled with NaN bytes before each case, so an element a kernel forgets to write shows. One line per case (``PASS``,
``FAIL`` with the tensors over their limits, ``ERROR`` with the exception); a case never stops the rest.
The cases are split into shards (one per backend and dtype) run as parallel processes: Triton compiles
kernels on the CPU, one process each; a shard whose process dies (a CUDA error poisons a process) is
restarted after the case that killed it. Lines land in ``DIR/correctness/<shard>.txt`` as they come, and
``DIR/correctness.txt`` / ``correctness.json`` gather them at the end.

**speed**: every workload of WORKLOADS.md (:data:`msfused.bench.workloads.WORKLOADS`) at its full N in
bfloat16, inference and training, naive, each fused backend and ``'auto'``, through
:func:`msfused.bench.runner.run` (CUDA events, L2 flushed, interleaved, the floor); ``torch.compile`` of the
naive block in inference for at most three workloads (measured last); a ``torch.profiler`` breakdown of
one call per workload, mode and implementation, and a cProfile of 20 training steps of each fused backend on
the first workload (where the host time goes). Before timing, the Triton kernels of every workload are
compiled and autotuned once in parallel processes (Triton's on-disk cache then serves the timing process;
its autotuner still measures every configuration of the shipped lists, alone on the GPU).
``DIR/results.json`` (device, versions, commit, every row, the profiles) is rewritten after each
workload; ``table.txt``, ``profile.txt`` and ``host_profile.txt`` beside it. An implementation that breaks
the device (a sticky CUDA error) costs only the group it broke: the phase starts again without it
(:func:`speed`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("nchw", "channels_last")
#: torch.compile of the naive block (inference) for at most three workloads: compiling costs ~10-30 s each.
COMPILE_WORKLOADS = ("psp_mmseg", "pyramid_seed", "psp_small")
#: Draws whose mean error a half-precision case is judged on, and how many it is judged on where that mean is
#: over its limit: one draw's error is heavy-tailed (a ReLU mask flip, a near-cancelling sum), and the suite
#: judges on 24 (tests/conftest.py, HALF_PRECISION_TRIALS: on 8, a projection case whose mean errors are
#: 0.77-1.00x the naive module's still failed on about 1% of seeds). A case failing at 3 draws is drawn 21 more
#: times and judged on all 24, so a passing case costs 3 draws.
HALF_DRAWS, HALF_DRAWS_AGAIN = 3, 24


def _say(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def commit() -> str:
    """The checkout's commit, with ' (with local changes)' when the tree differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" (with local changes)" if dirty else "")


# ---------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------


def make_configs(count: int, seed: int, max_hw: int = 33) -> List[Dict[str, Any]]:
    """``count`` seeded random block configurations: factor pyramids and bins alternate; down modes, up modes,
    kernel sizes 1 and 3, norms (none, train, eval) cycle so that a few configurations cover each; the rest
    (levels, channels, bias, activation, input position, align_corners, sizes up to ``max_hw``) is drawn; every
    fourth has a projection (its kernel size, norm, bias and activation cycle). Every seventh from the sixth
    has a map ``max_hw + 7`` larger on each side (49-73 for the default 33): more than one tile of the CUDA
    kernels' (2,048 outputs), so that their multi-tile paths run on the GPU too (the CPU emulation runs them
    with small tiles)."""
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        kind = "ms" if i % 2 == 0 else "psp"
        norm = ("batch", None)[(i // 2) % 2]
        train = (i // 4) % 2 == 1
        kw: Dict[str, Any] = dict(
            branch_channels=rng.randint(2, 9),
            kernel_size=(1, 3)[(i // 3) % 2],
            up_mode=("bilinear", "nearest")[(i // 6) % 2] if i % 5 else "bilinear",
            align_corners=rng.random() < 0.5,
            bias=rng.random() < 0.6,
            norm=norm,
            activation=rng.choice(["relu", "silu", "gelu", None]),
            input_position=rng.choice(["first", "last", None]),
        )
        if kind == "ms":
            kw["scales"] = tuple(sorted(rng.sample([1, 2, 3, 4], rng.randint(1, 3))))
            kw["down_mode"] = ("avg", "bilinear", "nearest")[(i // 2) % 3]
        else:
            kw["bins"] = tuple(rng.sample([1, 2, 3, 6, (2, 3)], rng.randint(1, 4)))
        if i % 4 == 3:  # every fourth with a projection (SPEC.md, "The projection"), its fields from i (no draw);
            # its norm in eval mode only: in training, biases before it would have true gradients of 0 (rounding
            # noise that accuracy.true_zero_gradients does not know of; tests/test_projection.py covers that mode)
            kw["project"] = dict(out_channels=3 + i % 5, kernel_size=(3, 1)[(i // 4) % 2], bias=(i // 4) % 3 == 0,
                                 norm=None if train else "batch", activation=("relu", "gelu", None)[(i // 4) % 3])
        n = rng.randint(2, 4)
        if train and norm and kind == "psp":
            n = 8  # float32 batch statistics over a handful of values are ill-conditioned (tests/conftest.py, Case)
        shape = (n, rng.randint(3, 12 if max_hw > 16 else 4), rng.randint(9, max_hw), rng.randint(9, max_hw))
        if i % 7 == 5 and max_hw > 16:  # (no extra draw: the other configurations stay as they were)
            shape = shape[:2] + (shape[2] + max_hw + 7, shape[3] + max_hw + 7)
        configs.append(dict(index=i, kind=kind, kwargs=kw, shape=shape, train=train))
    return configs


def config_id(cfg: Dict[str, Any]) -> str:
    kw = cfg["kwargs"]
    levels = ("s" + ",".join(map(str, kw["scales"])) + f" {kw['down_mode']}") if cfg["kind"] == "ms" else \
        ("bins " + ",".join(f"{b[0]}x{b[1]}" if isinstance(b, tuple) else str(b) for b in kw["bins"]))
    return (f"c{cfg['index']:02d} {levels} k{kw['kernel_size']} up={kw['up_mode']}{' ac' if kw['align_corners'] else ''}"
            f" norm={kw['norm'] or '-'} act={kw['activation'] or '-'} pos={kw['input_position'] or '-'}"
            f" bias={'T' if kw['bias'] else 'F'}"
            + (f" proj{kw['project']['kernel_size']}x{kw['project']['out_channels']}" if "project" in kw else "")
            + f" {'train' if cfg['train'] else 'eval'} "
            + "x".join(map(str, cfg["shape"])))


def _build(cfg: Dict[str, Any], device: torch.device, seed: int):
    """(naive, fused) with the same random parameters and BatchNorm state, float64, on ``device``."""
    import msfused

    from .workloads import _randomise

    naive_cls = msfused.NaiveMultiScaleBlock if cfg["kind"] == "ms" else msfused.NaivePyramidPooling
    fused_cls = msfused.MultiScaleBlock if cfg["kind"] == "ms" else msfused.PyramidPooling
    naive = naive_cls(cfg["shape"][1], **cfg["kwargs"])
    _randomise(naive, torch.Generator().manual_seed(seed))
    fused = fused_cls(cfg["shape"][1], **cfg["kwargs"])
    fused.load_state_dict(naive.state_dict())
    mode = cfg["train"]
    return naive.double().to(device).train(mode), fused.double().to(device).train(mode)


# ---------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------


def poison(device: torch.device) -> None:
    """Free blocks of the CUDA caching allocator filled with 0xFF bytes (NaN in every float dtype): the next
    allocations (outputs, scratch) reuse them, so an element a kernel forgets to write reads NaN. Triton's own
    buffers are poisoned by ``launch.POISON``."""
    if device.type != "cuda":
        return
    blocks = [torch.empty(2**20, dtype=torch.uint8, device=device) for _ in range(48)]  # the small-block pool
    blocks += [torch.empty(16 * 2**20, dtype=torch.uint8, device=device) for _ in range(8)]
    for b in blocks:
        b.fill_(255)
    del blocks


def _forward_backward(module: nn.Module, x: torch.Tensor, g: Optional[torch.Tensor], backend: Optional[str]):
    """(output, grads of [x] + parameters) of one call; backend None: the module as it is (naive)."""
    import contextlib

    import msfused

    ctx = msfused.use_backend(backend) if backend else contextlib.nullcontext()
    params = list(module.parameters())
    with ctx:
        out = module(x)
        if g is None:
            g = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
        grads = torch.autograd.grad(out, [x] + params, g.to(out.dtype))
    return out, grads, g


def check_case(cfg: Dict[str, Any], dtype: torch.dtype, fmt: str, backend: str, device: torch.device,
               seed: int) -> Dict[str, Any]:
    """Runs ``backend`` on one configuration in ``dtype`` and ``fmt`` and checks it (the module docstring);
    returns {"status": "PASS" | "FAIL", "worst": ..., "failures": [...]}."""
    import msfused

    from .accuracy import ZeroGradProbe, norm_err, spec_limit, true_zero_gradients

    naive64, fused64 = _build(cfg, device, seed)
    half = dtype in (torch.float16, torch.bfloat16)
    draws = 0
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    names = ["x"] + [n for n, _ in fused64.named_parameters()]
    zero = true_zero_gradients(fused64)
    sums: Dict[str, List[float]] = {}  # name -> [err fused, err naive] summed over draws
    problems: List[str] = []
    gen = torch.Generator().manual_seed(seed + 1)

    def draw():
        ref, own, fused = copy.deepcopy(naive64), copy.deepcopy(naive64).to(dtype), copy.deepcopy(fused64).to(dtype)
        x = torch.randn(cfg["shape"], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format)
        x_before = x.clone()
        xs = [x.detach().clone().contiguous(memory_format=memory_format).requires_grad_(True) for _ in range(2)]
        x64 = x.detach().double().requires_grad_(True)
        probe = ZeroGradProbe(ref)
        try:
            poison(device)
            out, grads, g = _forward_backward(fused, xs[0], None, backend)
            out_nograd = None
            if not cfg["train"]:  # the inference kernels (nothing saved for backward) are another path
                poison(device)
                with msfused.use_backend(backend), torch.inference_mode():
                    out_nograd = fused(x)
            out_ref, grads_ref, _ = _forward_backward(ref, x64, g.double(), None)
            out_own, grads_own, _ = _forward_backward(own, xs[1], g, None)
            s = g.double().norm().item()
            if out.dtype != dtype:
                problems.append(f"output dtype {out.dtype}")
            if not out.is_contiguous(memory_format=memory_format):
                problems.append(f"output strides {out.stride()} not {fmt}")
            for o in (out, out_nograd):
                if o is not None and torch.isnan(o).any():
                    problems.append("NaN in the output" + (" (no grad)" if o is out_nograd else ""))
            if not torch.equal(xs[0].detach(), x_before):
                problems.append("x was modified")
            tensors = [("output", out, out_ref, out_own, None)] + \
                ([("output (no grad)", out_nograd, out_ref, out_own, None)] if out_nograd is not None else []) + [
                (f"grad {n}", a, b, c, s) for n, a, b, c in zip(names, grads, grads_ref, grads_own)]
            buffers_ref, buffers_own = dict(ref.named_buffers()), dict(own.named_buffers())
            for n, buf in fused.named_buffers():
                if n.endswith("num_batches_tracked"):
                    if not torch.equal(buf, buffers_ref[n]):
                        problems.append(f"{n} = {buf.item()}, reference {buffers_ref[n].item()}")
                else:
                    tensors.append((n, buf, buffers_ref[n], buffers_own[n], None))
            zero_index = probe.param_names()
            for name, a, b, c, scale in tensors:
                pname = name[5:] if name.startswith("grad ") else None
                if pname in zero:
                    if not half and not probe.within(zero_index[pname], a, 1e-5, scale):
                        problems.append(f"{name} (true value 0) over its rounding bound")
                    continue
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += norm_err(a, b, scale)
                acc[1] += norm_err(c, b, scale)
        finally:
            probe.remove()

    def over_limits():  # (tensors over their limit on the mean of the draws so far, the worst)
        over, worst_ratio, worst = [], -1.0, ""
        for name, (e_sum, e_own_sum) in sums.items():
            e, e_own = e_sum / draws, e_own_sum / draws
            limit = spec_limit(dtype, e_own)
            ratio = e / limit
            if not e <= limit:
                mean = f"; mean of {draws} draws" if half else ""
                over.append(f"{name}: err {e:.2e} > {limit:.2e} (naive in {str(dtype)[6:]}: {e_own:.2e}{mean})")
            if not ratio <= worst_ratio:  # NaN counts as the worst
                worst_ratio, worst = ratio, f"{name} err {e:.2e} / limit {limit:.2e}"
        return over, worst

    for target in ((HALF_DRAWS, HALF_DRAWS_AGAIN) if half else (1,)):
        while draws < target:
            draw()
            draws += 1
        over, worst = over_limits()
        if not over or problems:
            break
    problems += over
    return {"status": "FAIL" if problems else "PASS", "worst": worst, "failures": problems}


# ---------------------------------------------------------------------------------------------------
# Correctness: shards of cases in worker processes
# ---------------------------------------------------------------------------------------------------


def _cases(args) -> List[Dict[str, Any]]:
    configs = make_configs(args.configs, args.seed, args.max_hw)
    return [dict(config=c, dtype=d, fmt=f) for c in configs for d in args.dtypes for f in FORMATS]


def device_backends(device: torch.device) -> List[str]:
    """The fused backends that run tensors on ``device`` here ('cuda' and 'triton' on a GPU; 'cpu', and
    'triton' under its interpreter, on a CPU)."""
    from msfused import backends

    probe = torch.empty(0, device=device)
    return [b for b in ("cuda", "triton", "cpu") if backends._unsupported_reason(b, probe) is None]


def _shard_cases(args, dtype: str, chunk: int) -> List[Dict[str, Any]]:
    """The cases of shard (dtype, chunk): configurations whose index is ``chunk`` modulo ``args.chunks``."""
    return [c for c in _cases(args) if c["dtype"] == dtype and c["config"]["index"] % args.chunks == chunk]


def _line(status: str, backend: str, case: Dict[str, Any], detail: str) -> str:
    return f"{status:<5} {backend:<7} {case['dtype']:<8} {case['fmt']:<13} {config_id(case['config'])}  {detail}"


def _worker(args) -> int:
    """Runs the cases of one shard from ``--start`` on, appending one line per case to ``--lines``."""
    device = torch.device(args.device)
    _setup_numerics(device)
    cases = _shard_cases(args, args.shard_dtype, args.chunk)
    deadline = args.deadline
    with open(args.lines, "a") as out:
        for i in range(args.start, len(cases)):
            case = cases[i]
            if deadline and time.time() > deadline:
                out.write(_line("SKIP", args.backend, case, "not run: the phase's time budget was spent") + "\n")
                out.flush()
                continue
            try:
                result = check_case(case["config"], DTYPES[case["dtype"]], case["fmt"], args.backend, device,
                                    args.seed * 1000 + case["config"]["index"])
                detail = "; ".join(result["failures"]) if result["failures"] else f"worst: {result['worst']}"
                line = _line(result["status"], args.backend, case, detail)
            except Exception as e:  # noqa: BLE001  (reported, then the next case)
                text = str(e).strip().splitlines()
                line = _line("ERROR", args.backend, case, f"{type(e).__name__}: {text[0] if text else ''}"[:400])
                fatal = device.type == "cuda" and _cuda_broken()
                out.write(f"{line}\n")
                out.flush()
                if fatal:  # a CUDA error poisons the process: the parent restarts after this case
                    traceback.print_exc()
                    return 3
                continue
            out.write(line + "\n")
            out.flush()
    return 0


def _cuda_broken() -> bool:
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def _setup_numerics(device: torch.device) -> None:
    """SPEC.md's float32 rule is with TF32 off; Triton's buffers NaN-poisoned."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        from msfused.triton import launch

        launch.POISON = True
    except ImportError:
        pass


def _shard_command(args, shard: tuple, lines: str, start: int) -> List[str]:
    backend, dtype, chunk = shard
    cmd = [sys.executable, "-m", "msfused.bench.gpu_check", "_worker", "--device", args.device,
           "--configs", str(args.configs), "--seed", str(args.seed), "--dtypes", ",".join(args.dtypes),
           "--max-hw", str(args.max_hw), "--backend", backend, "--shard-dtype", dtype, "--chunk", str(chunk), "--chunks", str(args.chunks),
           "--lines", lines, "--start", str(start)]
    if args.deadline:
        cmd += ["--deadline", str(args.deadline)]
    return cmd


def _count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def correctness(args) -> int:
    import msfused

    device = torch.device(args.device)
    backends = [b for b in args.backends or (device_backends(device) + ["auto"]) if b not in args.skip_backends]
    unavailable = {b: msfused.availability(b)[1] for b in backends if not msfused.availability(b)[0]}
    root = os.path.join(args.out, "correctness")
    os.makedirs(root, exist_ok=True)
    args.deadline = time.time() + args.budget if args.budget else 0.0
    # Shards: backend x dtype x a slice of the configurations, 'cuda' first and 'auto' last (by then Triton's
    # on-disk cache holds most of the kernels 'auto' measures).
    shards = [(b, d, k) for b in backends if b not in unavailable for d in args.dtypes for k in range(args.chunks)]
    _say(f"correctness on {device}: {args.configs} configurations x {', '.join(args.dtypes)} x {', '.join(FORMATS)}; "
         f"backends {', '.join(backends)}; {len(shards)} shards, {args.jobs} at a time")

    def path_of(shard):
        return os.path.join(root, "-".join(map(str, shard)) + ".txt")

    for shard in [(b, "unavailable") for b in backends] + shards:
        for suffix in (".txt", ".log"):
            if os.path.exists(path_of(shard)[:-4] + suffix):
                os.remove(path_of(shard)[:-4] + suffix)
    for b, why in unavailable.items():
        _say(f"backend {b}: unavailable: {why}")
        with open(os.path.join(root, f"{b}-unavailable.txt"), "w") as f:
            f.write(f"UNAVAILABLE {b}: {why}\n")
    pending = list(shards)
    running: Dict[tuple, subprocess.Popen] = {}
    restarts: Dict[tuple, int] = {}
    try:
        with _terminated_cleanly(lambda: running.values()):
            _run_shards(args, pending, running, restarts, path_of)
    finally:
        code = _gather_correctness(args, root)
    return code


def _run_shards(args, pending, running, restarts, path_of) -> None:
    while pending or running:
        while pending and len(running) < args.jobs:
            shard = pending.pop(0)
            path = path_of(shard)
            with open(path[:-4] + ".log", "a") as log:
                running[shard] = subprocess.Popen(_shard_command(args, shard, path, _count_lines(path)),
                                                  stdout=subprocess.DEVNULL, stderr=log)
        time.sleep(0.2)
        for shard, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[shard]
            cases, done = _shard_cases(args, shard[1], shard[2]), _count_lines(path_of(shard))
            if done < len(cases):  # the process died (or gave up after a CUDA error): go on after that case
                restarts[shard] = restarts.get(shard, 0) + 1
                if rc != 3:  # died without writing the case it was on
                    with open(path_of(shard), "a") as f:
                        f.write(_line("ERROR", shard[0], cases[done], f"the worker process died (exit status "
                                      f"{rc}); see {os.path.basename(path_of(shard)[:-4])}.log") + "\n")
                if restarts[shard] <= len(cases):
                    pending.insert(0, shard)


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _terminated_cleanly(children):
    """SIGTERM (``timeout`` in bench/gpu_check.sh) raises here, and the child processes are killed on the way
    out, so that what was measured still gets written."""
    def handler(signum, frame):
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated as e:
        _say(f"stopped by {e}: writing what was measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in list(children()):
            if proc.poll() is None:
                proc.kill()


def _gather_correctness(args, root) -> int:
    """correctness.txt / .json from every shard's lines in ``root`` (this run's and those of an earlier
    invocation of the same check, e.g. bench/gpu_check.sh's Triton shards run during the build)."""
    order = {name: i for i, name in enumerate(("cuda", "triton", "cpu", "auto"))}
    dtypes = {name: i for i, name in enumerate(DTYPES)}

    def key(name: str):
        parts = name[:-4].split("-")
        return (order.get(parts[0], 9), dtypes.get(parts[1], 9), parts[2:])

    lines = []
    for name in sorted((n for n in os.listdir(root) if n.endswith(".txt")), key=key):
        with open(os.path.join(root, name)) as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    counts: Dict[str, Dict[str, int]] = {}
    for line in lines:
        status, backend = line.split()[0], line.split()[1].rstrip(":")
        counts.setdefault(backend, {}).setdefault(status, 0)
        counts[backend][status] += 1
    summary = [f"{b}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for b, c in counts.items()]
    with open(os.path.join(args.out, "correctness.txt"), "w") as f:
        f.write("\n".join(lines + [""] + summary) + "\n")
    result = {"device": args.device, "commit": commit(), "configs": args.configs, "seed": args.seed,
              "dtypes": args.dtypes, "counts": counts, "lines": lines}
    with open(os.path.join(args.out, "correctness.json"), "w") as f:
        json.dump(result, f, indent=2)
    for line in summary:
        _say(line)
    bad = any(line.split()[0] in ("FAIL", "ERROR", "SKIP") for line in lines)
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------


def _prewarm_worker(args) -> int:
    """One call of each fused backend (and 'auto') of one workload, both modes: fills Triton's on-disk cache."""
    from . import runner
    from .workloads import WORKLOADS, build

    device = torch.device(args.device)
    workload = WORKLOADS[args.workload]
    built = build(workload, args.n or workload.default_n(device), DTYPES[args.dtype], device)
    for mode in args.modes:
        runner.set_mode(built, mode)
        for impl in args.impls:
            step = runner.make_step(built, mode, impl)
            try:
                with step.active():
                    step()
            except Exception as e:  # noqa: BLE001  (the timing run reports it)
                _say(f"prewarm {args.workload} {mode} {impl}: {type(e).__name__}: {e}"[:300])
    return 0


def _prewarm(args, workloads, impls) -> None:
    """Compiles the Triton kernels of every workload in parallel processes (bounded by ``args.jobs``)."""
    fused = [i for i in impls if i in ("triton", "auto")]
    if not fused or torch.device(args.device).type != "cuda" or not args.prewarm_budget:
        return
    start = time.time()
    procs: List[subprocess.Popen] = []
    with _terminated_cleanly(lambda: procs):
        _start_prewarm(args, workloads, fused, procs, start)
    _say(f"Triton kernels compiled and autotuned for {len(workloads)} workloads in {time.time() - start:.0f} s")


def prewarm(args) -> int:
    """The ``prewarm`` command: :func:`_prewarm` for the workloads asked for."""
    from .workloads import select

    _prewarm(args, select(args.workloads), args.impls)
    return 0


def _start_prewarm(args, workloads, fused, procs, start) -> None:
    for w in workloads:
        cmd = [sys.executable, "-m", "msfused.bench.gpu_check", "_prewarm", "--device", args.device, "--workload",
               w.name, "--dtype", args.dtype, "--modes", ",".join(args.modes), "--impls", ",".join(fused)]
        if args.n:
            cmd += ["--n", str(args.n)]
        while sum(p.poll() is None for p in procs) >= args.jobs:
            time.sleep(0.2)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    for p in procs:
        try:
            p.wait(timeout=max(1.0, args.prewarm_budget - (time.time() - start)))
        except subprocess.TimeoutExpired:
            p.kill()


def profile_call(step, device: torch.device, top: int = 12) -> List[Dict[str, Any]]:
    """The kernels (or, on a CPU, the operators) of one call of ``step`` (warmed up), by self device time."""
    from torch.profiler import ProfilerActivity, profile

    from .timing import _quiet_stderr, synchronize

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with step.active():
        step()
        synchronize(device)
        with _quiet_stderr(), profile(activities=activities) as prof:
            step()
            synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels and copies only, not the host-side operators around them
        events = [e for e in events if getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type)] or events
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:120], "calls": e.count, "us": round(getattr(e, attr), 1)} for e in events[:top]]


def host_us(step, device: torch.device, calls: int = 20) -> float:
    """Host microseconds per call of ``step`` (warmed up), queued without waiting for the device: the cost of
    the Python and dispatch work around the kernels, which bounds a small workload's time."""
    from .timing import synchronize

    with step.active():
        step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        elapsed = time.perf_counter() - start
        synchronize(device)
    return round(elapsed / calls * 1e6, 1)


def host_profile(step, device: torch.device, calls: int = 20, top: int = 30) -> str:
    """cProfile of ``calls`` warmed-up calls of ``step`` (queued, one synchronisation at the end), the ``top``
    functions by own time: where a fused backend's host time per call goes (Python launchers, Triton's
    launch path, torch ops), which the speed rows give only in total."""
    import cProfile
    import io
    import pstats

    from .timing import synchronize

    with step.active():
        step()
        synchronize(device)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
        synchronize(device)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()[-12000:]


def _auto_diagnostics(args, workloads, dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """What 'auto' measures once everything is warm (its table cleared, each key measured again), beside the
    first measurement in ``autotune``; and where the host time of an 'auto' call goes (cProfile, the smallest
    workload). For the next change to 'auto', not a figure of the README."""
    import cProfile
    import io
    import pstats

    from msfused import autotune

    from . import runner
    from .workloads import build

    out: Dict[str, Any] = {"remeasured": {}}
    first = autotune.table()
    autotune.clear()
    for w in workloads:
        for mode in args.modes:
            built = build(w, args.n or w.n, dtype, device)
            runner.set_mode(built, mode)
            step = runner.make_step(built, mode, "auto")
            with step.active():
                step()
            del built, step
    for k, c in autotune.table().items():
        before = first.get(k)
        out["remeasured"][k] = {"backend": c.backend, "times_ms": c.times_ms,
                                "first": None if before is None else {"backend": before.backend,
                                                                      "times_ms": before.times_ms}}
    small = min(workloads, key=lambda w: w.n * w.channels * w.height * w.width)
    built = build(small, args.n or small.n, dtype, device)
    runner.set_mode(built, "inference")
    step = runner.make_step(built, "inference", "auto")
    with step.active():
        step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            step()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    out["host_profile"] = {"workload": small.name, "calls": 50, "text": text.getvalue()[-12000:]}
    return out


#: Times the speed phase starts itself again after an implementation broke the device (see :func:`speed`).
MAX_RESTARTS = 3


def _device_broken(device: torch.device) -> bool:
    """Whether the device is unusable in this process (a CUDA error such as an illegal address is sticky)."""
    return device.type == "cuda" and _cuda_broken()


def _restart(argv: List[str]) -> None:
    """Replaces this process by ``python -m msfused.bench.gpu_check *argv`` (a fresh CUDA context; the same
    PID, so the shell's ``timeout`` still applies)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "msfused.bench.gpu_check", *argv])


def _group_label(w, mode: str, impls: Sequence[str]) -> str:
    return f"{w.name} {mode}" + (" compiled" if "compiled" in impls else "")


def _culprit(rows: List[Dict[str, Any]], profiles: List[Dict[str, Any]]):
    """(implementation, error) that broke the device in a group: the first to fail in the order the group ran
    them (each implementation's warm-up ends in a synchronisation, so an asynchronous fault is reported
    by the call that caused it: naive first, then as listed), else the first failed profile; (None, None)."""
    for row in sorted(rows, key=lambda r: r["impl"] != "naive"):
        if row["error"]:
            return row["impl"], row["error"]
    for p in profiles:
        if p.get("error"):
            return p["impl"], p["error"]
    return None, None


def speed(args) -> int:
    """The ``speed`` command (the module's docstring). An implementation that breaks the device (a sticky
    CUDA error: every later call in the process fails) would cost every later group: the group is dropped,
    the phase saves what it has and starts itself again (:func:`_restart`) from ``results.json``
    (``--resume``) without that implementation (``--exclude``; 'auto' then chooses among the others), on
    the same deadline, at most :data:`MAX_RESTARTS` times; ``broken`` in the JSON says what broke where."""
    with _auto_without(args.exclude):
        return _speed(args)


@contextlib.contextmanager
def _auto_without(excluded: Sequence[str]):
    """'auto' chooses among its candidates less ``excluded`` meanwhile."""
    from msfused import backends

    saved = dict(backends.AUTO_CANDIDATES)
    backends.AUTO_CANDIDATES.update({k: tuple(c for c in v if c not in excluded) for k, v in saved.items()})
    try:
        yield
    finally:
        backends.AUTO_CANDIDATES.update(saved)


def _speed(args) -> int:
    from . import report, runner
    from .workloads import build, select

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    workloads = select(args.workloads)
    excluded = list(args.exclude)
    impls = ["naive"] + [i for i in args.backends or device_backends(device) + ["auto"] if i not in excluded]
    compiled = [w for w in (args.compile_workloads or []) if w in {x.name for x in workloads}][:3]
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    deadline = args.deadline or (time.time() + args.budget if args.budget else None)
    _say(f"speed on {device}: {len(workloads)} workloads, {args.dtype}, {', '.join(args.modes)}, {', '.join(impls)}; "
         f"torch.compile ({args.compile_backend}) in inference for {', '.join(compiled) or 'none'}"
         + (f"; without {', '.join(excluded)} (broke the device), resuming {args.resume}" if args.resume else ""))
    if args.resume:  # (the kernels compiled by the first process: Triton's on-disk cache has them)
        with open(args.resume) as f:
            result: Dict[str, Any] = json.load(f)
    else:
        _prewarm(args, workloads, impls)
        result = {"commit": commit(), "argv": args.argv, "rows": [], "profiles": [], "skipped": [],
                  "host_profiles": [], "done": [], "broken": []}
    rates = {dtype: _rates_of(result)} if result.get("rates") else None  # (resumed: measured already)

    def save() -> None:
        from msfused import autotune  # what 'auto' chose per key, with the times it measured

        result["autotune"] = {k: {"backend": c.backend, "times_ms": c.times_ms, "errors": c.errors}
                              for k, c in autotune.table().items()}
        report.save_json(result, results_path)
        if result["rows"]:
            with open(os.path.join(args.out, "table.txt"), "w") as f:
                f.write(report.format_table(result) + "\n")
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            for p in result["profiles"]:
                host = f" (host {p['host_us']} us per call)" if p.get("host_us") is not None else ""
                f.write(f"{p['workload']} {p['mode']} {p['impl']}{host}:\n")
                f.writelines(f"  {k['us']:>10.1f} us  {k['calls']:>4}x  {k['name']}\n" for k in p["kernels"])
        if result["host_profiles"]:
            with open(os.path.join(args.out, "host_profile.txt"), "w") as f:
                for h in result["host_profiles"]:
                    f.write(f"== {h['workload']} {h['mode']} {h['impl']}, {h['calls']} calls ==\n{h['text']}\n")

    groups = [(w, m, impls) for w in workloads for m in args.modes] + \
        [(w, "inference", ["naive", "compiled"]) for w in workloads if w.name in compiled]
    for w, mode, group_impls in groups:
        label = _group_label(w, mode, group_impls)
        if label in result["done"]:  # (measured before a restart)
            continue
        if deadline and time.time() > deadline:
            result["skipped"].append(f"{w.name} {mode} {','.join(group_impls)}: the phase's time budget was spent")
            result["done"].append(label)
            save()
            continue
        had = {k: len(result[k]) for k in ("rows", "profiles", "host_profiles")}
        part = runner.run([w], modes=[mode], dtypes=[dtype], impls=group_impls, device=device, n=args.n,
                          full_n=True, warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds,
                          memory=device.type == "cuda", progress=_say, rates=rates,
                          compile_backend=args.compile_backend)
        rates = rates or {dtype: _rates_of(part)}
        result["environment"] = part["environment"]
        result["rates"] = part["rates"]
        if "compiled" in group_impls:
            _merge_compiled(result["rows"], part["rows"])
        else:
            result["rows"] += part["rows"]
        if "compiled" not in group_impls:
            try:
                built = build(w, args.n or w.n, dtype, device)
                runner.set_mode(built, mode)
                for impl in group_impls:
                    entry = {"workload": w.name, "mode": mode, "impl": impl}
                    try:
                        step = runner.make_step(built, mode, impl)
                        entry["kernels"] = profile_call(step, device)
                        entry["host_us"] = host_us(step, device)
                        if mode == "train" and impl not in ("naive", "auto") and not any(
                                h["impl"] == impl for h in result["host_profiles"]):
                            # where the host time of a fused training step goes (the first workload's)
                            result["host_profiles"].append({"workload": w.name, "mode": mode, "impl": impl,
                                                            "calls": 20, "text": host_profile(step, device)})
                        for row in result["rows"]:
                            if (row["workload"], row["mode"], row["impl"]) == (w.name, mode, impl):
                                row["host_ms"] = entry["host_us"] / 1e3
                    except Exception as e:  # noqa: BLE001
                        entry["kernels"], entry["error"] = [], f"{type(e).__name__}: {e}"[:300]
                    result["profiles"].append(entry)
                del built
            except Exception as e:  # noqa: BLE001  (e.g. out of memory)
                result["profiles"].append({"workload": w.name, "mode": mode, "impl": "*", "kernels": [],
                                           "error": f"{type(e).__name__}: {e}"[:300]})
        if _device_broken(device):
            culprit, error = _culprit(part["rows"], result["profiles"][had["profiles"]:])
            if "compiled" not in group_impls:
                for k, n in had.items():
                    del result[k][n:]
            result["broken"].append({"group": label, "impl": culprit, "error": error})
            rerun = culprit not in (None, "naive", "compiled", "*")  # else the group itself is given up
            if not rerun:
                result["skipped"].append(f"{label}: the device broke ({culprit or 'cause unknown'}: {error})")
                result["done"].append(label)
            save()
            if len(result["broken"]) <= MAX_RESTARTS:
                _say(f"speed: {culprit} broke the device in {label} ({error}); starting again without it")
                exclude = ",".join(excluded + ([culprit] if rerun else []))
                _restart(args.argv + ["--resume", results_path, "--exclude", exclude,
                                      "--deadline", repr(deadline or 0.0)])
                return 1  # (a stand-in _restart returns)
            result["skipped"] += [f"{_group_label(*g)}: the device broke {len(result['broken'])} times"
                                  for g in groups if _group_label(*g) not in result["done"]]
            save()
            break
        result["done"].append(label)
        save()
    if device.type == "cuda" and "auto" in impls:
        try:
            result["diagnostics"] = _auto_diagnostics(args, workloads, dtype, device)
        except Exception as e:  # noqa: BLE001  (a diagnostic never fails the phase)
            result["diagnostics"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        save()
    failed = [r for r in result["rows"] if r["error"] and r["impl"] != "compiled"]
    _say(f"speed: {len(result['rows'])} rows, {len(failed)} failed, {len(result['skipped'])} groups skipped, "
         f"{len(result['broken'])} broke the device")
    return 1 if failed or result["skipped"] or result["broken"] else 0


def _merge_compiled(rows: List[Dict[str, Any]], part: List[Dict[str, Any]]) -> None:
    """Adds a compiled group's ``compiled`` row after its workload's inference rows (its speedup over naive
    from the naive call timed beside it) and their speedups over it; the second naive row is dropped."""
    compiled = next(r for r in part if r["impl"] == "compiled")
    key = (compiled["workload"], compiled["mode"], compiled["dtype"])
    same = [i for i, r in enumerate(rows) if (r["workload"], r["mode"], r["dtype"]) == key]
    if compiled["median_ms"]:
        for i in same:
            if rows[i]["median_ms"]:
                rows[i]["speedup_vs_compiled"] = compiled["median_ms"] / rows[i]["median_ms"]
    rows.insert(same[-1] + 1 if same else len(rows), compiled)


def _rates_of(part: Dict[str, Any]):
    from .floor import Rates

    return Rates(**part["rates"][0])


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m msfused.bench.gpu_check", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = max(1, (os.cpu_count() or 2) - 2)  # Triton compiles on one core per process

    c = sub.add_parser("correctness", help="every GPU backend against the reference on seeded random configurations")
    c.add_argument("--out", required=True)
    c.add_argument("--device", default=default_device)
    c.add_argument("--configs", type=int, default=24, help="random configurations (default 24)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-hw", type=int, default=33, help="largest H and W drawn (default 33; at least 9)")
    c.add_argument("--dtypes", type=_list, default=["float64", "float32", "bfloat16"])
    c.add_argument("--backends", type=_list, default=None, help="default: every fused backend of the device, and auto")
    c.add_argument("--skip-backends", type=_list, default=[], help="leave these out (e.g. checked by another run)")
    c.add_argument("--jobs", type=int, default=jobs, help=f"shards run at once (default {jobs})")
    c.add_argument("--chunks", type=int, default=4, help="shards per backend and dtype (default 4)")
    c.add_argument("--budget", type=float, default=0.0, help="seconds after which no new case starts (0: none)")

    w = sub.add_parser("_worker")
    for name in ("--device", "--backend", "--shard-dtype", "--lines"):
        w.add_argument(name, required=True)
    w.add_argument("--configs", type=int, required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--max-hw", type=int, required=True)
    w.add_argument("--dtypes", type=_list, required=True)
    w.add_argument("--start", type=int, default=0)
    w.add_argument("--chunk", type=int, required=True)
    w.add_argument("--chunks", type=int, required=True)
    w.add_argument("--deadline", type=float, default=0.0)

    s = sub.add_parser("speed", help="the workloads in bfloat16: naive, each fused backend, auto, torch.compile")
    s.add_argument("--out", required=True)
    s.add_argument("--device", default=default_device)
    s.add_argument("--workloads", type=_list, default=None, help="default: all")
    s.add_argument("--n", type=int, default=None, help="batch size (default: each workload's full N)")
    s.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    s.add_argument("--backends", type=_list, default=None, help="default: every fused backend of the device, and auto")
    s.add_argument("--modes", type=_list, default=["inference", "train"])
    s.add_argument("--compile-workloads", type=_list, default=list(COMPILE_WORKLOADS),
                   help="torch.compile of the naive block (inference) for these, at most three")
    s.add_argument("--compile-backend", default="inductor", help="torch.compile backend (a dry run: eager)")
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--reps", type=int, default=30)
    s.add_argument("--max-seconds", type=float, default=1.0, help="time budget of one case's timed calls")
    s.add_argument("--jobs", type=int, default=jobs, help="parallel processes compiling Triton kernels first")
    s.add_argument("--prewarm-budget", type=float, default=90.0, help="seconds (0: no prewarm)")
    s.add_argument("--budget", type=float, default=0.0, help="seconds after which no new group starts (0: none)")
    # set by the phase itself when it starts again after an implementation broke the device
    s.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    s.add_argument("--exclude", type=_list, default=[], help=argparse.SUPPRESS)
    s.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)

    pp = sub.add_parser("prewarm", help="compile and autotune the Triton kernels of the workloads (parallel processes)")
    pp.add_argument("--device", default=default_device)
    pp.add_argument("--workloads", type=_list, default=None, help="default: all")
    pp.add_argument("--n", type=int, default=None, help="batch size (default: each workload's full N)")
    pp.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    pp.add_argument("--modes", type=_list, default=["inference", "train"])
    pp.add_argument("--impls", type=_list, default=["triton"])
    pp.add_argument("--jobs", type=int, default=jobs)
    pp.add_argument("--prewarm-budget", type=float, default=120.0)

    pw = sub.add_parser("_prewarm")
    pw.add_argument("--device", required=True)
    pw.add_argument("--workload", required=True)
    pw.add_argument("--dtype", required=True)
    pw.add_argument("--modes", type=_list, required=True)
    pw.add_argument("--impls", type=_list, required=True)
    pw.add_argument("--n", type=int, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    for name in ("dtypes",):
        bad = [d for d in getattr(args, name, []) or [] if d not in DTYPES]
        if bad:
            print(f"unknown dtype(s) {', '.join(bad)}; known: {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    return {"correctness": correctness, "_worker": _worker, "speed": speed, "_prewarm": _prewarm_worker,
            "prewarm": prewarm}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
