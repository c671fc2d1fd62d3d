"""Builds the msfused._C extension with torch.utils.cpp_extension and ninja.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension must be compiled against
the torch that is installed, and an isolated build would fetch another one.

Build switches, from the environment:
  FORCE_CUDA=1           build the CUDA kernels even where torch sees no GPU (needs a CUDA torch and nvcc)
  MSFUSED_CPU_ONLY=1     never build CUDA kernels
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0+PTX"
  MAX_JOBS               parallel compile jobs for ninja
  MSFUSED_DEBUG=1        -O0 -g
"""

import glob
import json
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


debug = _flag("MSFUSED_DEBUG")
cuda_sources = _sources("csrc/cuda/**/*.cu") + _sources("csrc/cuda/**/*.cpp")
torch_has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
with_cuda = (
    not _flag("MSFUSED_CPU_ONLY")
    and torch_has_cuda
    and bool(cuda_sources)
    and (torch.cuda.is_available() or _flag("FORCE_CUDA"))
)
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/autograd/*.cpp")
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# -fopenmp: at::parallel_for is inlined into our kernels and is an OpenMP region in torch's CPU builds;
# without the flag it silently runs on one thread. omp simd: the kernels' lane-parallel reductions.
# -ffp-contract=off: no FMA where the CPU has it, so that the kernels' AVX2 and AVX-512 clones (csrc/cpu/simd.h)
# and the baseline build round alike, and a result does not depend on the machine's vector width.
cxx_flags += ["-std=c++17", "-fopenmp", "-ffp-contract=off", "-fdiagnostics-color=always"]
link_flags = ["-fopenmp"]  # resolves to the libgomp.so.1 torch already loaded
define_macros = [("MSFUSED_WITH_CUDA", "1")] if with_cuda else []
# No --use_fast_math: the kernels must match the reference (gelu's erf, exact division and sqrt).
nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3"]
nvcc_flags += ["-std=c++17", "-lineinfo"]

print("msfused build configuration:")
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
print(f"  CUDA kernels: {'yes' if with_cuda else 'no'}"
      + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""))
print(f"  MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}, debug={debug}")
print(f"  sources: {', '.join(sources + (cuda_sources if with_cuda else []))}")

if with_cuda:
    ext = CUDAExtension(
        "msfused._C",
        sources + cuda_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "msfused._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


class BuildWithInfo(BuildExtension):
    """Writes msfused/_C.build.json beside the extension: the torch it was built against, and CUDA or not,
    so that msfused can refuse to load it under another torch (an ABI mismatch would crash, not raise)."""

    def _info_path(self, extension):
        return os.path.join(os.path.dirname(self.get_ext_fullpath(extension.name)), "_C.build.json")

    def get_outputs(self):  # so that editable installs copy it beside the extension too
        return super().get_outputs() + [self._info_path(e) for e in self.extensions]

    def build_extension(self, extension):
        super().build_extension(extension)
        target = self._info_path(extension)
        info = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if with_cuda else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
            "python": sys.version.split()[0],
        }
        # Also beside the sources: editable installs load the extension from there.
        for path in {target, os.path.join(HERE, "msfused", "_C.build.json")}:
            with open(path, "w") as f:
                json.dump(info, f, indent=2)


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=True)},
)
