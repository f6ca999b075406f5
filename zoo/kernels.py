"""CPU kernels the zoo writes itself, where torch's are slow on a CPU kind: built once per machine from the C++
sources in zoo/csrc/, then loaded as torch operators (torch.ops.zoo_kernels.*), which compiled code calls as it calls
torch's own.

- int4_rows: rows of x times an int4 layer packed for torch's _weight_int4pack_mm_for_cpu, in its AVX2 build's
  layout (blocks of 32 rows) or its AVX-512 one's (64) (zoo/quantization.py: Int4Linear; a GGUF file's blocks with
  quantize="native", zoo.quantize's "int4"). That kernel dequantizes each weight to float32 before multiplying: ~6
  GB/s over SmolLM2's layers with bf16 activations on 2 Zen 3 cores, and with float32 ones a reference loop 10x
  slower. int4_rows multiplies the codes themselves and applies a group's scale and zero once per group (`python
  bench/int4_rows.py`; on Zen 4, whose AVX-512 build of torch's kernel is faster, one row 1.06-1.45x its speed).
- int8_rows: rows of x times signed 8-bit row-major codes with a scale (and a zero point) per group: the 8-bit
  layers (Int4Linear keeps them row-major where these kernels run) and a tied 8-bit head reading its embedding's
  codes (Int4Linear.row_codes), one byte per weight in one pass over x, where the int4 kernel's two planes read 1.25
  over x twice (`python bench/int4_rows.py`: the head rows).
Both apply a group's scale once per group and round the result once to x's dtype, inside the operator (so that
compiled code, which fuses what follows, computes what eager code does), and each row of x gets the same operations
alone as in a batch. bfloat16 rows of x are multiplied as 16-bit integers, each group's scaled by the power of two that
puts its largest |x| in [2^14, 2^15) (exact for every x within 2^7 of it; a smaller one is off by at most 2^-15 of
it), their products with the codes summed exactly in int32 (_mm256_madd_epi16: 16 products an instruction, where
float32 FMAs take 8 and convert the codes first): one row of SmolLM2's layers 1.5-3.1x torch's kernel's speed, where
float32 products were 1.2-1.6x. float32 rows are multiplied in float32. On a CPU with AVX512-VNNI (Zen 4, Xeons
since Cascade Lake) int8_rows gets the same int32 group sums from byte products (_mm256_dpbusd_epi32: 32 products
an instruction), eight groups added across at once: one row 1.3-1.9x the 16-bit products' speed where the codes
are in cache (one-off scripts, ZOO_KERNELS_VNNI toggled in one process: Gemma 3's decoding ~6% faster; its head,
168 MB, as fast either way: memory-bound).
- attend: softmax(q kᵀ * scale + mask) v for the few queries of decoding over the KV cache (zoo/prepack.py's
  CacheAttend), each query row on its own, in float32: 2-3x torch's SDPA there (`python bench/attend.py`).

The build runs the system's C++ compiler (CXX, else c++; g++ or clang with OpenMP) against the installed torch's
headers, ~15 s, into the folder torch builds its C++ extensions in (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), under zoo_kernels/ and a name hashing the sources, the flags, the compiler's, torch's and
Python's versions; later processes load that file. Where a build fails (no compiler, no AVX2 and FMA), the callers
keep torch's kernels: int4_rows() returns None and build_error() says why. ZOO_KERNELS=0 turns the kernels off (to
compare both paths)."""
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("zoo")
SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("rows.cpp", "attend.cpp"))
HEADERS = (Path(__file__).with_name("csrc") / "vec.h",)
# -ffp-contract=off: the compiler fuses no scalar multiply-add on its own, which could differ between the kernels'
# instances for one row and for several (a row's products must not depend on the rows beside it)
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w")
_error = None  # why the last build failed


def int4_rows():
    """torch.ops.zoo_kernels.int4_rows where it can run here (x86 with AVX2, built or buildable), else None.
    int4_rows(x [M, K], packed, group_size, scales_and_zeros, block_rows) -> [M, N] in x's dtype: the product that
    torch.ops.aten._weight_int4pack_mm_for_cpu computes over the first four arguments, packed in the layout of its
    AVX2 build (block_rows = 32) or its AVX-512 one (64): zoo.quantization.packed_block_rows(); x and the scales and
    zeros both bfloat16 or both float32; computed in float32."""
    return torch.ops.zoo_kernels.int4_rows.default if _loaded() else None


def int8_rows():
    """torch.ops.zoo_kernels.int8_rows where it can run here, else None. int8_rows(x [M, K], codes int8 [N, K],
    scales [N, G], zeros [N, G] or None) -> [M, N] in x's dtype: x @ W^T for w = code * scale + zero per group of
    K / G inputs (a multiple of 8); x, scales and zeros all bfloat16 or all float32."""
    return torch.ops.zoo_kernels.int8_rows.default if _loaded() else None


def attend():
    """torch.ops.zoo_kernels.attend where it can run here, else None. attend(q [B, H, T, D], k, v [B, H_kv, S, D],
    mask broadcasting to [B, 1, T, S] or None, causal, scale or None) -> [B, H, T, D]: softmax(q kᵀ * scale + mask)
    v, as the model files' Attend computes it (causal with no mask: SDPA's is_causal; query head h reads key/value
    head h // (H / H_kv)), in float32, rounded once to q's dtype; q, k, v and mask all bfloat16 or all float32, D a
    multiple of 8 up to 512, k and v contiguous in D. For the few query rows of decoding (zoo/prepack.py's
    CacheAttend): each row is computed on its own (the rows spread over the threads)."""
    return torch.ops.zoo_kernels.attend.default if _loaded() else None


def build_error():
    """Why the kernels could not be built or loaded here (None if they were, or were not tried)."""
    return _error


@functools.cache
def _loaded():
    global _error
    if os.environ.get("ZOO_KERNELS", "1") == "0":
        _error = "ZOO_KERNELS=0"
        return False
    if not {"avx2", "fma"} <= _cpu_flags():
        _error = "this CPU has no AVX2 and FMA"
        return False
    try:
        torch.ops.load_library(str(_library()))
        torch.library.register_fake("zoo_kernels::int4_rows")(
            lambda x, packed, *_: x.new_empty(x.shape[0], packed.shape[0]))
        torch.library.register_fake("zoo_kernels::int8_rows")(
            lambda x, codes, *_: x.new_empty(x.shape[0], codes.shape[0]))
        torch.library.register_fake("zoo_kernels::attend")(
            lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format))
    except Exception as e:  # whatever fails, torch's kernels still run: the build is an optimisation
        _error = f"{type(e).__name__}: {e}"
        log.warning("the zoo's AVX2 kernels are not available, torch's kernels run instead: %s", _error)
        return False
    return True


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), ()))


def _library():
    """The built library's path, building it first where this machine has none for this source and torch."""
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, errors="replace",
                             timeout=60).stdout  # (a new compiler builds anew)
    texts = [source.read_text() for source in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join((*texts, compiler, version, abi, *FLAGS, torch.__version__, sys.version))
                         .encode()).hexdigest()[:16]
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / "zoo_kernels"
    path = folder / f"zoo_kernels-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building the zoo's AVX2 kernels into %s (once per machine and torch version, ~15 s)", folder)
    # built beside its final name, then renamed: a process loading the library never sees half a file, and two
    # processes building at once each rename a whole one
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        includes = [f"-I{p}" for p in cpp_extension.include_paths()]
        libraries = [f"-L{p}" for p in cpp_extension.library_paths()]
        done = subprocess.run([compiler, *FLAGS, abi, *includes, *map(str, SOURCES), *libraries, "-lc10", "-ltorch_cpu",
                               "-o", tmp], capture_output=True, text=True, errors="replace", timeout=600)
        if done.returncode != 0:
            names = " and ".join(source.name for source in SOURCES)
            raise RuntimeError(f"building {names} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
