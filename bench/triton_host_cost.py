"""Host time per call of the Triton backend's launchers, measured without a GPU.

A GPU run showed the Triton backend's calls spending more host time (Python launchers, Triton's launch path,
torch ops) than device time on most workloads. This measures the host side on a machine without a GPU:
Triton's real launch path runs against a stand-in driver (an sm_90 target: every kernel variant is compiled by
ptxas as on a GPU; loading the binary and the final C launch do nothing), on CPU tensors of the workload's
shape. What it reports is this CPU's host time of

* a call: the launchers (``msfused/triton/launch.py``) plus Triton's per-launch work (argument binding and
  specialisation, the kernel cache, the autotuners' key);
* the launchers alone (``--stubbed``: the launch replaced by a no-op).

It leaves out the C launcher's argument packing and ``cuLaunchKernel`` (a few microseconds a launch), the
torch ops' CUDA launches (their CPU kernels run instead: use small workloads such as ``psp_small``, whose CPU
work is small), and the functional layer and autograd around the operators. Figures from this CPU, not from a
GPU machine's host.

    python bench/triton_host_cost.py psp_small --n 8             # inference and a training step
    python bench/triton_host_cost.py psp_small --n 8 --profile   # and a cProfile of the training step

Relies on Triton's driver interface (``triton.runtime.driver.set_active``; written against Triton 3.6).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the compiled launch path, not the interpreter

import torch  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return (1, 1, 64, 0, 1024)  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Launcher:
    """The compiled kernel's launcher: counts launches, launches nothing."""

    launches = 0

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        _Launcher.launches += 1


class StandInDriver:
    """Triton's active driver for an sm_90 GPU that is not there."""

    utils = _Utils()
    launcher_cls = _Launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        return ty


def _per_call(f, calls: int = 10, runs: int = 5) -> float:
    """Seconds per call of ``f``: the fastest of ``runs`` runs of ``calls`` calls (the machine's noise is
    one-sided)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--n", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", action="store_true", help="a cProfile of 20 training steps")
    args = parser.parse_args(argv)

    driver.set_active(StandInDriver())
    # no timing without a GPU: an autotuned kernel takes its list's first configuration
    autotuner.Autotuner._bench = lambda self, *a, config=None, **k: [float(self.configs.index(config))]

    from torch._library.triton import set_wrap_triton_enabled

    from msfused._ops import level_backward_grad_x, level_backward_inputs
    from msfused.bench.workloads import WORKLOADS
    from msfused.triton import launch, plan

    w = WORKLOADS[args.workload]
    dtype = getattr(torch, args.dtype)
    module = w.fused_class(w.channels, **w.config).to(dtype=dtype)
    x = torch.randn(w.input_shape(args.n), dtype=dtype)

    def inference():
        module.eval()
        weight, bias, scale, shift, _stats, _eps, a = plan._call_args(module)
        launch.inference(x, weight, bias, scale, shift, **a)

    def training_step():
        module.train()
        weight, bias, scale, shift, stats, eps, a = plan._call_args(module)
        out, level, pre, mean, var = launch.forward(x, weight, bias, scale, shift, stats, eps, **a)
        block = (a["factor"], a["bins"], a["input_position"])
        grad, op_x = level_backward_inputs(torch.empty_like(out), x, level, *block)
        gx = launch.backward(grad, op_x, weight, scale, shift, level, pre, mean, var, stats, eps, **a,
                             output_mask=[True, True])[0]
        level_backward_grad_x(gx, x, *block)

    torch.set_num_threads(1)
    real_launch = launch._launch
    # as inside the operators (torch.library.triton_op): launches go straight to Triton, not through the HOP
    with torch.no_grad(), set_wrap_triton_enabled(False):
        for name, f in (("inference", inference), ("training step", training_step)):
            start = time.perf_counter()
            f()  # compiles every variant (ptxas), not timed
            first = time.perf_counter() - start
            f()
            _Launcher.launches = 0
            total = _per_call(f)
            launches = _Launcher.launches // 50
            launch._launch = lambda *a, **k: None
            try:
                alone = _per_call(f)
            finally:
                launch._launch = real_launch
            print(f"{args.workload} N={args.n} {args.dtype} {name}: {total * 1e6:.0f} us per call on this CPU's host, "
                  f"{launches} Triton launches; the launchers alone {alone * 1e6:.0f} us, Triton's launch path "
                  f"{(total - alone) * 1e6:.0f} us ({(total - alone) * 1e6 / max(launches, 1):.0f} us a launch); "
                  f"first call {first:.1f} s (compiles)", flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                training_step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
