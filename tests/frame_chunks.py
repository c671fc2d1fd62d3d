"""The test process keeps CPython's freed frame-stack chunks for reuse instead of unmapping them.

CPython (3.11 here) keeps Python frames on a data stack of 16 KiB chunks, each one mapped (mmap) through the
object arena allocator when a call needs it, and unmapped (munmap) as soon as the call that opened it returns.
A hot call that sits at a chunk boundary maps and unmaps a chunk every time: Triton's interpreter, which runs
each kernel op as a few levels of Python calls, does that hundreds of thousands of times in one test. Measured
on the 2-core CI VM (`strace -c`, `time`): ``test_triton.py::test_small_blocks[tr_six...]`` made ~1 million
mmap/munmap pairs and took 35 s, 22 s of them in the kernel (the calls and the page faults of each fresh
chunk); with this cache 10 s, 0.6 s in the kernel.

``install()`` compiles a small arena allocator (C, below; the system C compiler, a fraction of a second) and
hands it to ``PyObject_SetArenaAllocator``: blocks are still mmapped, and freed blocks up to 64 KiB (frame-stack
chunks; obmalloc's arenas are 1 MiB) are kept, a few dozen at most, for the next request of the same size.
It changes how the test process gets memory for its own frames, nothing that the tests check. Where it cannot
be installed (no C compiler, another Python implementation, a free-threaded build) the suite runs as before;
pytest's header says which (``reason()``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional

_SOURCE = r"""
#include <stddef.h>
#include <sys/mman.h>

#define KEEP 64                    /* freed blocks kept at most */
#define KEEP_BYTES (64 * 1024)     /* kept only up to this size: frame-stack chunks, not obmalloc's arenas */

static void* kept[KEEP];
static size_t kept_size[KEEP];
static int kept_count;

/* Called with the GIL held, as CPython calls its arena allocator. */
static void* chunk_alloc(void* ctx, size_t size) {
  (void)ctx;
  for (int i = kept_count - 1; i >= 0; --i) {
    if (kept_size[i] == size) {
      void* p = kept[i];
      --kept_count;
      kept[i] = kept[kept_count];
      kept_size[i] = kept_size[kept_count];
      return p;
    }
  }
  void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

/* Any block CPython frees was mmapped (by this allocator or by CPython's own, whose blocks it also frees). */
static void chunk_free(void* ctx, void* p, size_t size) {
  (void)ctx;
  if (size <= KEEP_BYTES && kept_count < KEEP) {
    kept[kept_count] = p;
    kept_size[kept_count] = size;
    ++kept_count;
    return;
  }
  munmap(p, size);
}

/* PyObjectArenaAllocator's layout (Include/cpython/objimpl.h, unchanged since 3.4). */
struct {
  void* ctx;
  void* (*alloc)(void*, size_t);
  void (*free)(void*, void*, size_t);
} msfused_chunk_allocator = {NULL, chunk_alloc, chunk_free};
"""

_reason: Optional[str] = "not installed"
_tried = False
_keep = None  # the loaded library (kept alive: CPython calls into it from now on)


def reason() -> Optional[str]:
    """None when the cache is installed, else why not."""
    return _reason


def install() -> Optional[str]:
    """Installs the cache in this process once (see the module); returns reason()."""
    global _reason, _tried, _keep
    if _tried:
        return _reason
    _tried = True
    if sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED"):
        _reason = "not CPython with the GIL"
        return _reason
    if sys.platform != "linux":
        _reason = "not Linux"
        return _reason
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        _reason = f"no C compiler ({cc})"
        return _reason
    folder = tempfile.mkdtemp(prefix="msfused-chunks-")
    try:
        src, lib = os.path.join(folder, "chunks.c"), os.path.join(folder, "chunks.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        done = subprocess.run([cc, "-O2", "-shared", "-fPIC", src, "-o", lib], capture_output=True, text=True)
        if done.returncode != 0:
            _reason = f"{cc} failed: {done.stderr.strip()[-300:]}"
            return _reason
        loaded = ctypes.CDLL(lib)
        allocator = ctypes.c_char.in_dll(loaded, "msfused_chunk_allocator")
        ctypes.pythonapi.PyObject_SetArenaAllocator.argtypes = [ctypes.c_void_p]
        ctypes.pythonapi.PyObject_SetArenaAllocator.restype = None
        ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.addressof(allocator))
        _keep, _reason = loaded, None
        return _reason
    except (OSError, AttributeError) as e:
        _reason = f"could not load it: {e}"
        return _reason
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the library stays mapped
