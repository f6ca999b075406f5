"""`zoo eval SOURCE --data FILES`: validation loss and sliding-window perplexity.

    zoo eval out/step-0002000 --data input.txt          # one training checkpoint
    zoo eval out/ --data input.txt --split val          # every checkpoint in a run, in step order
    zoo eval smollm2-135m-instruct --data test.txt --window 1024 --stride 512
"""
import math

import torch

from .. import chat_data, data
from ..evaluation import sliding_window_loss, sources
from ..pretrained import load_source

HELP = "validation loss and sliding-window perplexity"


def add_arguments(p):
    p.add_argument("source", help="checkpoint folder, folder of checkpoints, preset, hub id, HF folder or .gguf")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files to score, or JSONL conversations (scored on the assistant's tokens)")
    p.add_argument("--split", choices=["all", "val"], default="all",
                   help=f"score all the text, or only its last {data.VAL_FRACTION * 100:g}%% (a training run's "
                        "validation split)")
    p.add_argument("--window", type=int, help="tokens per window (default: block_size, at most 1024)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: window / 2)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    p.add_argument("--tokenizer", help="tokenizer source, when SOURCE has none")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights (faster; perplexity differs slightly)")


def run(args):
    for name in ("window", "stride", "max_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else None
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
        stride = args.stride if args.stride is not None else max(1, window // 2)
        loss = sliding_window_loss(model, tokens, window, stride, args.batch_size, device)
        print(f"{name}loss {loss:.4f} ppl {math.exp(loss):.4f}", flush=True)
    return 0
