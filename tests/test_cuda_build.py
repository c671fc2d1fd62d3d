"""The CUDA kernels compile with nvcc alone (CUDA's own headers plus csrc/*.h) for sm_80 and sm_90, and
ptxas reports no register spills in any of them. The torch binding (csrc/cuda/multi_scale_cuda.cpp)
compiles against the installed torch's c10/cuda and ATen headers and CUDA's, warning-free, and every
launcher it calls is defined by the kernels' object. Needs nvcc, no GPU and no CUDA build of torch.

The flags are the ones setup.py and CMakeLists.txt give nvcc (-O3, C++17, -lineinfo, no fast math, and the
half-precision operator switches torch adds), so the report is the one the real build gets.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
# torch.utils.cpp_extension adds these to every nvcc command line (CMakeLists.txt passes them too).
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr")
# Kernels that must be in the report (so that the spill check cannot pass vacuously), by their source name.
EXPECTED_KERNELS = ("levels_kernel", "pool_levels_kernel", "stats_partial_kernel", "merge_stats_kernel",
                    "epilogue_up_kernel", "up_grad_kernel", "reduce_partials_kernel", "norm_grad_kernel", "dx_kernel",
                    "project_accumulate_kernel", "project_adjoint_kernel")
DTYPES = ("float", "double", "__half", "__nv_bfloat16")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile the CUDA kernels")


def _demangled_kernel(mangled: str) -> str:
    """The kernel's source name and its template arguments, from an Itanium-mangled name (enough for the
    names in this file: `..._cu_<hash>` + length-prefixed name + template arguments)."""
    m = re.search(r"(\d+)((?:levels|pool_levels|stats_partial|merge_stats|epilogue_up|up_grad|reduce_partials|norm_grad|dx|project_accumulate|project_adjoint)_kernel)", mangled)
    return m.group(2) if m else mangled


def _ptxas_reports(tmp: Path) -> dict:
    """{arch: {mangled kernel name: {'registers': int, 'spill_stores': int, 'spill_loads': int, 'stack': int}}}
    from one nvcc call per source with a -gencode per arch (the host side is compiled once, not once per
    arch); ptxas reports each arch's kernels after a "Compiling entry function ... for 'sm_XX'" line."""
    reports: dict = {arch: {} for arch in ARCHS}
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    for src in KERNEL_SOURCES:
        cmd = [NVCC, "-c", *gencode, "-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v",
               *TORCH_NVCC_DEFINES, "-I", str(ROOT / "csrc"), str(src), "-o", str(tmp / f"{src.stem}.o")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
        arch = current = None
        for line in (r.stdout + r.stderr).splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
            if m:
                current, arch = m.group(1), m.group(2)
                reports[arch].setdefault(current, {})
                continue
            m = re.search(r"Function properties for (\S+)", line)
            if m and arch is not None:
                current = m.group(1)
                reports[arch].setdefault(current, {})
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current is not None:
                reports[arch][current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                              spill_loads=int(m.group(3)))
                continue
            m = re.search(r"Used (\d+) registers", line)
            if m and current is not None:
                reports[arch][current]["registers"] = int(m.group(1))
    return reports


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    assert KERNEL_SOURCES, "csrc/cuda/ holds no .cu sources"
    objects = tmp_path_factory.mktemp("nvcc")
    return _ptxas_reports(objects), objects


@pytest.fixture(params=ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def report(request, compiled):
    """(arch, that arch's ptxas report, the folder of the kernels' objects, which hold every arch)."""
    reports, objects = compiled
    return request.param, reports[request.param], objects


def test_kernels_present(report):
    arch, rep, _ = report
    names = {}
    for mangled in rep:
        names.setdefault(_demangled_kernel(mangled), []).append(mangled)
    missing = [k for k in EXPECTED_KERNELS if k not in names]
    assert not missing, f"sm_{arch}: kernels missing from the ptxas report: {missing}; found {sorted(names)}"
    # Every dtype of the templated forward and backward kernels is instantiated.
    for kernel in EXPECTED_KERNELS:
        for dtype in DTYPES:
            mangled_dtype = {"float": "If", "double": "Id", "__half": "I6__half", "__nv_bfloat16": "I13__nv_bfloat16"}[dtype]
            assert any(mangled_dtype in m for m in names[kernel]), f"sm_{arch}: {kernel}<{dtype}> is not compiled"


def test_no_register_spills(report):
    arch, rep, _ = report
    bad = {m: v for m, v in rep.items() if v.get("spill_stores", 0) or v.get("spill_loads", 0)}
    summary = "\n".join(f"  {_demangled_kernel(m)} {m}: {v}" for m, v in sorted(rep.items()))
    assert not bad, f"sm_{arch}: register spills:\n" + "\n".join(f"  {m}: {v}" for m, v in bad.items()) + \
        f"\nall kernels:\n{summary}"
    for m, v in rep.items():
        assert "spill_stores" in v and "registers" in v, f"sm_{arch}: incomplete ptxas report for {m}: {v}"


# --- the torch binding ---------------------------------------------------------------------------------

BINDING = ROOT / "csrc" / "cuda" / "multi_scale_cuda.cpp"


def _cuda_include_dirs() -> list:
    """CUDA's own include directories, as nvcc itself reports them (nvcc may be a wrapper script outside
    the toolkit, so its path says nothing)."""
    r = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                       capture_output=True, text=True, timeout=60)
    dirs = re.findall(r'(?:-I|-isystem" ")"?([^" ]+)', r.stdout + r.stderr)
    return [d for d in dict.fromkeys(dirs) if Path(d, "cuda_runtime_api.h").exists()]


def _symbols(obj: Path, which: str) -> set:
    r = subprocess.run(["nm", "-C", f"--{which}-only", str(obj)], capture_output=True, text=True, check=True)
    # Lines read "<address> <type> <name>", or "<type> <name>" for undefined symbols; names hold spaces.
    return {m.group(1) for m in re.finditer(r"^\s*(?:[0-9a-f]+\s+)?[A-Za-z?]\s+(.+)$", r.stdout, re.M)}


@pytest.fixture(scope="module")
def binding_object(tmp_path_factory):
    """The binding compiled the way torch.utils.cpp_extension compiles a CUDA extension's .cpp files (the
    same defines, the installed torch's include paths and ABI), with -Wall -Wextra -Werror for our code
    (torch's and CUDA's headers are system headers here, so their own warnings do not count)."""
    import torch
    from torch.utils.cpp_extension import include_paths

    torch_include = [Path(p) for p in include_paths()]
    if not (torch_include[0] / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    cuda_include = _cuda_include_dirs()
    if not cuda_include:
        pytest.skip("nvcc reports no include directory holding cuda_runtime_api.h")
    tmp = tmp_path_factory.mktemp("binding")
    # The one header a CPU build of torch leaves out is generated by torch's CUDA build; this is its
    # content in the CUDA wheels (shared libraries).
    macros = tmp / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (torch_include[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    gxx = shutil.which("c++") or shutil.which("g++")
    if gxx is None:
        pytest.skip("no C++ compiler on PATH")
    obj = tmp / "multi_scale_cuda.o"
    cmd = [gxx, "-c", "-std=c++17", "-O3", "-fPIC", "-Wall", "-Wextra", "-Werror",
           "-DMSFUSED_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-isystem", str(tmp / "include"),
           *[a for p in torch_include for a in ("-isystem", str(p))],
           *[a for p in cuda_include for a in ("-isystem", p)],
           "-I", str(ROOT / "csrc"), str(BINDING), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the binding does not compile:\n{' '.join(cmd)}\n{r.stderr[-8000:]}"
    return obj


def test_binding_compiles_against_torch_cuda_headers(binding_object):
    undefined = _symbols(binding_object, "undefined")
    # The real CUDA path was compiled, not the emulation: it takes the stream and device from c10::cuda.
    assert any("c10::cuda::getCurrentCUDAStream" in s for s in undefined), sorted(undefined)[:50]
    assert not any("emu::" in s for s in undefined | _symbols(binding_object, "defined"))


def test_binding_launchers_defined_by_kernels(binding_object, report):
    """Every msfused::cuda function the binding calls is defined, with the same signature, in the
    kernels' object for this arch: a declaration in multi_scale_kernels.h that drifted from its definition
    would otherwise surface only as an undefined symbol when a CUDA build loads."""
    arch, _, objects = report
    needed = {s for s in _symbols(binding_object, "undefined") if s.startswith("msfused::cuda::")}
    assert any(s.startswith("msfused::cuda::launch_epilogue_up(") for s in needed), sorted(needed)
    defined = set()
    for src in KERNEL_SOURCES:
        defined |= _symbols(objects / f"{src.stem}.o", "defined")
    missing = sorted(needed - defined)
    assert not missing, f"sm_{arch}: launchers the binding calls but the kernels do not define: {missing}"
