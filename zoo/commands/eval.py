"""`zoo eval SOURCE --data FILES`: validation loss and sliding-window perplexity (--objective mlm: masked-token
loss and accuracy).

    zoo eval out/step-0002000 --data input.txt          # one training checkpoint
    zoo eval out/ --data input.txt --split val          # every checkpoint in a run, in step order
    zoo eval smollm2-135m-instruct --data test.txt --window 1024 --stride 512
    zoo eval out/step-0005000 --data input.txt --objective mlm        # a model trained with --objective mlm
"""
import math

import torch

from .. import data
from ..evaluation import sliding_window_loss, sources
from ..masking import MASK_PROB, masked_evaluation
from ..pretrained import load_source

HELP = "validation loss and sliding-window perplexity"


def add_arguments(p):
    p.add_argument("source", help="checkpoint folder, folder of checkpoints, preset, hub id, HF folder or .gguf")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files to score")
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
    p.add_argument("--objective", choices=["causal", "mlm"], default="causal",
                   help="causal: next-token loss and perplexity; mlm: loss and accuracy at masked tokens, with the "
                        "same seeded masks every time (consecutive windows; --stride does not apply)")
    p.add_argument("--mask-prob", type=float, default=MASK_PROB, help=f"mlm: share of tokens masked (default "
                                                                      f"{MASK_PROB})")
    p.add_argument("--seed", type=int, default=0, help="mlm: seed of the masks (default 0)")


def run(args):
    for name in ("window", "stride", "max_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else None
    for name, source in sources(args.source):
        model, tokenizer = load_source(source, device=device, dtype=dtype, tokenizer=args.tokenizer)
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
