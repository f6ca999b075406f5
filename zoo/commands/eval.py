"""`zoo eval SOURCE --data FILES`: validation loss and sliding-window perplexity (--objective mlm: masked-token
loss and accuracy); `zoo eval SOURCE --tasks T1,T2`: lm-evaluation-harness's benchmarks (zoo/harness.py;
needs pip install 'zoo-lm[eval]').

    zoo eval out/step-0002000 --data input.txt          # one training checkpoint
    zoo eval out/ --data input.txt --split val          # every checkpoint in a run, in step order
    zoo eval smollm2-135m-instruct --data test.txt --window 1024 --stride 512
    zoo eval smollm2-135m-instruct --tasks hellaswag,arc_easy --batch-size 16 --output results.json
    zoo eval out/ --tasks my_task --include-path my_tasks/ --limit 100   # your own YAML tasks
    zoo eval out/step-0005000 --data input.txt --objective mlm        # a model trained with --objective mlm
"""
import json
import math
import os

import torch

from .. import chat_data, data
from ..atomic import write_file
from ..evaluation import sliding_window_loss, sources
from ..mlm import MASK_PROB, masked_evaluation
from ..sources import load_source

HELP = "loss and perplexity of a text (or masked-token accuracy), or lm-evaluation-harness benchmarks"


def add_arguments(p):
    p.add_argument("source", help="checkpoint folder, folder of checkpoints, preset, hub id, HF folder or .gguf")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files to score (loss and perplexity), or JSONL conversations "
                   "(scored on the assistant's tokens)")
    p.add_argument("--tasks", metavar="T1,T2", help="lm-evaluation-harness tasks instead, e.g. hellaswag,arc_easy")
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own task YAML files (with --tasks)")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per prompt (with --tasks)")
    p.add_argument("--limit", type=float, metavar="N", help="at most N examples per task, or a fraction < 1 "
                   "(with --tasks; for trying things out)")
    p.add_argument("--output", metavar="PATH", help="write the harness's results as JSON (with --tasks)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights' dtype (default float32)")
    p.add_argument("--split", choices=["all", "val"], default="all",
                   help=f"score all the text, or only its last {data.VAL_FRACTION * 100:g}%% (a training run's "
                        "validation split)")
    p.add_argument("--window", type=int, help="tokens per window (default: block_size, at most 1024)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: window / 2)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    p.add_argument("--tokenizer", help="tokenizer source, when SOURCE has none")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default 4); with --tasks, requests "
                   "per batch (default 16)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights (faster; perplexity differs slightly)")
    p.add_argument("--objective", choices=["causal", "mlm"], default="causal",
                   help="causal: next-token loss and perplexity; mlm: loss and accuracy at masked tokens, with the "
                        "same seeded masks every time (consecutive windows; --stride does not apply)")
    p.add_argument("--mask-prob", type=float, help=f"mlm: share of tokens masked (default {MASK_PROB})")
    p.add_argument("--seed", type=int, help="mlm: seed of the masks (default 0)")


def run(args):
    # (a window's first token is context only: a window scores one token less than it holds)
    for name, least in (("window", 2), ("stride", 1), ("max_tokens", 1), ("batch_size", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, not {getattr(args, name)}")
    if args.bf16 and args.dtype not in (None, "bfloat16"):
        raise ValueError(f"--bf16 and --dtype {args.dtype} name two dtypes: give one")
    for name in ("mask_prob", "seed"):
        if getattr(args, name) is not None and args.objective != "mlm":
            raise ValueError(f"--{name.replace('_', '-')} sets the masks of --objective mlm: add it, or drop the flag")
    args.mask_prob = MASK_PROB if args.mask_prob is None else args.mask_prob
    args.seed = 0 if args.seed is None else args.seed
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else getattr(torch, args.dtype) if args.dtype else None
    if args.tasks:
        given = [f"--{n.replace('_', '-')}" for n in ("window", "stride", "max_tokens") if getattr(args, n) is not None]
        given += ["--split"] * (args.split != "all") + ["--objective"] * (args.objective != "causal")
        if given:
            raise ValueError(f"{', '.join(given)} {'go' if len(given) > 1 else 'goes'} with --data (scoring a text); "
                             "--tasks runs lm-evaluation-harness benchmarks: drop it")
        return run_tasks(args, device, dtype)
    if not args.data:
        raise ValueError("give --data FILES (loss and perplexity of a text) or --tasks T1,T2 "
                         "(lm-evaluation-harness benchmarks)")
    for name in ("output", "include_path", "num_fewshot", "limit"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} goes with --tasks (lm-evaluation-harness benchmarks); "
                             "--data scores a text: drop it")
    if args.batch_size is None:
        args.batch_size = 4
    for name, source in sources(args.source):
        model, tokenizer = load_source(source, device=device, dtype=dtype, tokenizer=args.tokenizer)
        if chat_data.is_chat(args.data):  # conversations: the loss on the assistant's tokens, as training counts it
            loss = chat_data.assistant_loss(model, tokenizer, args.data, args.window or model.config.block_size,
                                            args.batch_size, device, args.split)
            print(f"{name}loss {loss:.4f} ppl {math.exp(loss):.4f} (assistant tokens)", flush=True)
            continue
        tokens = data.tokenize(data.read_texts(args.data), tokenizer)
        if args.split == "val":
            tokens = data.split(tokens)[1]
        tokens = torch.from_numpy(tokens[:args.max_tokens].astype("int64"))
        window = args.window or min(model.config.block_size, 1024)
        if args.objective == "mlm":
            loss, accuracy = masked_evaluation(model, tokenizer, tokens, window, args.batch_size, device,
                                               args.mask_prob, args.seed)
            print(f"{name}masked_loss {loss:.4f} accuracy {accuracy:.4f}", flush=True)
            continue
        stride = args.stride if args.stride is not None else max(1, window // 2)
        loss = sliding_window_loss(model, tokens, window, stride, args.batch_size, device)
        print(f"{name}loss {loss:.4f} ppl {math.exp(loss):.4f}", flush=True)
    return 0


def run_tasks(args, device, dtype):
    """lm-evaluation-harness's tasks on each checkpoint of SOURCE: its results table, and --output's JSON."""
    if args.data:
        raise ValueError("--data and --tasks are two kinds of evaluation; give one of them")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be at least 0, not {args.num_fewshot}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, not {args.limit:g}")
    if args.output and os.path.exists(args.output):
        raise ValueError(f"--output {args.output} exists; name a new file (earlier results are not overwritten)")
    if args.include_path and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path {args.include_path}: no such folder")
    try:
        from .. import harness
        from lm_eval.utils import handle_non_serializable, make_table
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'zoo-lm[eval]' "
                         "(or pip install lm-eval)") from None
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    everything = {}
    for name, source in sources(args.source):
        results = harness.evaluate(source, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                                   limit=limit, batch_size=args.batch_size, dtype=dtype, device=device,
                                   tokenizer=args.tokenizer)
        if name:
            print(name.strip())
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        everything[name.strip() or source] = results
    if args.output:
        out = everything if len(everything) > 1 else next(iter(everything.values()))
        write_file(args.output, json.dumps(out, indent=2, default=handle_non_serializable))
    return 0
