"""`zoo generate [SOURCE] --prompt TEXT`: text (or a chat answer) from any zoo source, streamed to stdout."""
import sys
import time

import torch

from ..generation import complete
from ..prepack import prepack
from ..sources import describe_source, from_pretrained, load_source
from ..sampling import SamplingConfig

HELP = "generate text (default model: smollm2-135m-instruct)"


def add_arguments(parser):
    parser.add_argument("source", nargs="?", default="smollm2-135m-instruct",
                        help="a preset name (its pretrained weights), a hub repo id, a folder or a .gguf file "
                             "(default: smollm2-135m-instruct)")
    parser.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, the user message)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_sampling_arguments(parser)
    parser.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    parser.add_argument("--stop", action="append", help="end the text before this string (repeatable)")
    add_model_arguments(parser)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step (with --draft: the draft's): faster per token after ~20 s of "
                             "compiling (long outputs)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    draft = parser.add_mutually_exclusive_group()
    draft.add_argument("--draft", metavar="SOURCE",
                       help="speculative decoding with this draft model (a source sharing the model's tokenizer; "
                            "the same source with --draft-quantize int4 drafts with the model's own int4 copy): "
                            "the same text, fewer passes over the big model")
    draft.add_argument("--prompt-lookup", action="store_true",
                       help="speculative decoding with drafts copied from the prompt (n-gram lookup, no second "
                            "model): for answers that quote their input, e.g. edits and summaries")
    parser.add_argument("--num-draft", type=int, help="tokens drafted per round (default: 5 with --draft, 10 "
                                                      "with --prompt-lookup)")
    parser.add_argument("--draft-quantize", choices=("int8", "int4", "native"), help="quantize the --draft model")


MAX_NEW_TOKENS = 256


def add_sampling_arguments(parser):
    """The sampling flags (shared with `zoo chat`)."""
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (the default) is greedy: the same answer every time; e.g. 0.8 samples")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)


def add_model_arguments(parser):
    """How the model is loaded (shared with `zoo chat`)."""
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="the weights' (with --quantize: the activations') dtype (default: float32; "
                             "bfloat16 with --quantize)")
    parser.add_argument("--quantize", choices=("int8", "int4", "native"),
                        help="weight-only quantized matrices (faster decoding); native: a GGUF file's "
                             "Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K blocks as they are (the fastest for a quantized GGUF)")
    parser.add_argument("--adapter", help="a PEFT LoRA adapter folder to apply to the model")
    parser.add_argument("--tokenizer", help="tokenizer source, for a SOURCE without one (a folder, .gguf, "
                                            "tokenizer.json, 'gpt2', ...)")


def load_model(args, device):
    """The model and tokenizer that add_model_arguments' options describe, on `device`; sets args.dtype to the
    dtype chosen."""
    args.dtype = args.dtype or ("bfloat16" if args.quantize else "float32")
    return load_source(args.source, device=device, dtype=args.dtype, quantize=args.quantize, adapter=args.adapter,
                       tokenizer=args.tokenizer)


def sampling_of(args, num_beams=1):
    """The flags' SamplingConfig (checked before the minutes a download may take)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 0:  # (None: zoo chat's default, see there)
        raise ValueError(f"--max-new-tokens must be >= 0, not {args.max_new_tokens}")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, num_beams=num_beams, seed=args.seed)
    drawn = [f"--{name.replace('_', '-')}" for name in ("top_k", "top_p", "min_p", "seed")
             if getattr(args, name) is not None]
    if drawn and args.temperature == 0 and num_beams == 1:  # (beam search: refused above)
        raise ValueError(f"{' and '.join(drawn)} {'set' if len(drawn) > 1 else 'sets'} how tokens are sampled, but "
                         "--temperature is 0 (the default): greedy, which draws nothing; add --temperature, e.g. 0.8")
    return sampling


def run(args):
    sampling = sampling_of(args, args.beams)
    if args.num_draft is not None and args.num_draft < 1:
        raise ValueError(f"--num-draft must be >= 1, not {args.num_draft}")
    if args.num_draft is not None and not (args.draft or args.prompt_lookup):
        raise ValueError("--num-draft sets how many tokens a draft proposes: add --draft SOURCE or --prompt-lookup")
    if args.draft_quantize and not args.draft:
        raise ValueError("--draft-quantize quantizes the --draft model: add --draft SOURCE")
    if args.compile and args.prompt_lookup:
        raise ValueError("--compile with a draft compiles the draft model's step; --prompt-lookup has none: drop "
                         "--compile")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args, device)
    # oneDNN's reordered weights (zoo/prepack.py); with --compile (and no draft, whose step it then compiles) only the
    # quantized layers' copies for prompts (the compiled step cannot trace reordered float layers: it fuses its own)
    prepack(model, linear=not (args.compile and not args.draft))
    draft = "prompt-lookup" if args.prompt_lookup else None
    if args.draft:
        draft = from_pretrained(args.draft, device=device, dtype="bfloat16" if args.draft_quantize else args.dtype,
                                quantize=args.draft_quantize)  # (the model alone: it shares the target's tokenizer)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    stats, start = {}, time.perf_counter()
    for piece in complete(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          stop=args.stop, stream=True, compile=args.compile, draft=draft, num_draft=args.num_draft,
                          stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats.get("token_s"):  # sampling: the decode speed, apart from the prompt's prefill (and compiling)
        t = stats["token_s"]
        # the first decode step compiles; with a draft, the first round (its tokens come at once, after t[0])
        skip = 2 if args.compile and draft is None else 1
        speed = f"{(len(t) - skip) / (t[-1] - t[skip - 1]):.1f} tok/s" if len(t) > skip else "- tok/s"
        compiled = f" after a first decode step of {t[1] - t[0]:.1f} s (compiling)" if args.compile and len(t) > 1 else ""
        prefill = f"prefill of {stats['prompt_tokens']} tokens"
        if args.compile and draft is not None:  # (the draft's step compiles at its first one-token proposal)
            compiled = " after the first round" if len(t) > 1 else ""
            prefill = f"first round, with the {prefill} and the draft's step compiling"
        detail = f"{len(t)} new tokens, {speed}{compiled} ({prefill}: {t[0]:.2f} s)"
        if draft is not None:
            rate = f"{stats['accepted'] / stats['drafted']:.0%}" if stats["drafted"] else "-"
            detail += f"; {stats['accepted']} of {stats['drafted']} drafted tokens accepted ({rate})"
    else:
        detail = f"beam search, {time.perf_counter() - start:.2f} s" if args.beams > 1 else "no new tokens"
    quantized = f" ({args.quantize} weights)" if args.quantize else ""
    print(f"zoo generate: {detail}; {args.dtype}{quantized} on {device}; model: {describe_source(args.source)}",
          file=sys.stderr)
    return 0
