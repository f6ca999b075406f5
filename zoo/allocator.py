"""The C allocator under torch's CPU tensors, for training: keep freed memory for the next step's tensors.

torch has no caching allocator for CPU tensors: each one is malloc'ed and freed. glibc's malloc serves
requests over its mmap threshold with fresh pages from the kernel and trims the heap's free top back to the
kernel, so a training step that frees and re-creates the same activations faults many of them in again every step:
measured on shakespeare-char (12 x 64 tokens, 4 layers of 128, 2 AMD EPYC cores), ~3,000 page faults a step
(forward, backward and AdamW) and 28-31 ms a step, against ~0 faults and 22-24 ms with freed memory kept; a
768 x 512 bf16 GELU backward took 550-800 us into fresh pages, 170 us into reused ones. (jemalloc or tcmalloc,
preloaded, do the same.) Decoding showed no gain (its tensors are small and few), so only `zoo train` sets it.

It is a setting of the whole process: `zoo train` makes it (zoo/commands/train.py); the library never does. A
program of one's own that trains with zoo can call keep_freed_memory() first.
"""
import ctypes
import logging
import os

log = logging.getLogger("zoo")

# mallopt(3): name -> (parameter, value); room for a step's activations many times over at the presets' sizes
SETTINGS = {
    # requests under 32 MiB come from the heap (glibc's largest threshold on 64 bits; its default starts at 128 KiB
    # and only rises as mmapped chunks are freed), where freed memory can be reused
    "M_MMAP_THRESHOLD": (-3, 32 << 20),
    # the heap's free top goes back to the kernel only past 256 MiB (default: twice the mmap threshold)
    "M_TRIM_THRESHOLD": (-1, 256 << 20),
    # and grows 64 MiB at a time: address space, whose pages are only touched when used
    "M_TOP_PAD": (-2, 64 << 20),
}


def keep_freed_memory():
    """Set glibc's malloc to reuse freed memory (see the module's docstring). Returns True if all was set; False
    where the C library has no mallopt or refuses a value (macOS, Windows, musl, 32-bit glibc) and where the user
    set malloc's own way (GLIBC_TUNABLES with glibc.malloc, or a MALLOC_*_ variable), which is left as it is.
    With jemalloc or tcmalloc preloaded, glibc's settings are moot."""
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        log.debug("malloc: left to the environment's settings")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: the C library's, if it has mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [name for name, (param, value) in SETTINGS.items() if mallopt(param, value) != 1]
    if refused:
        log.debug("malloc: this C library refused %s", ", ".join(refused))
    return not refused
