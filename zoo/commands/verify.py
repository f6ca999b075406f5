"""`zoo verify SOURCE [--layers]`: zoo's logits (and hidden states) against transformers' on the same weights
(needs zoo-lm[reference])."""
import math
from pathlib import Path

from ..data import read_texts
from ..verification import verify

HELP = "compare zoo's logits with transformers' on the same weights"


def add_arguments(parser):
    parser.add_argument("source", help="preset name, hub repo id, local folder or .gguf file")
    parser.add_argument("--text", type=Path, help="a text file to take the token ids from (default: random ids)")
    parser.add_argument("--tokens", type=int, default=256, help="number of tokens to compare (default 256)")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="largest |dlogit| that passes, and with --layers the largest |dh| relative to the "
                             "layer's largest |h| (default 1e-4)")
    parser.add_argument("--layers", action="store_true",
                        help="also compare the hidden state after every block (transformers' output_hidden_states): "
                             "a table, and the first layer past the tolerance")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")


def run(args):
    if not math.isfinite(args.tol) or args.tol < 0:
        raise ValueError(f"--tol must be a finite number >= 0, not {args.tol}")
    text = read_texts([args.text])[0] if args.text else None
    r = verify(args.source, text=text, n_tokens=args.tokens, revision=args.revision, layers=args.layers)
    agree = round(r["top1"] * r["n_tokens"])
    ok = r["max_abs"] <= args.tol
    if args.layers:
        print(f"{'hidden state':<28} {'max |dh|':>9} {'max |h|':>9} {'relative':>9}")
        first = None
        for row in r["layers"]:
            relative = row["max_abs"] / max(row["max_ref"], 1e-30)
            if relative > args.tol and first is None:
                first = row["name"]
            print(f"{row['name']:<28} {row['max_abs']:9.2e} {row['max_ref']:9.2e} {relative:9.2e}"
                  f"{'   <- first past tolerance' if row['name'] == first else ''}")
        print(f"first layer past tolerance {args.tol:g}: {first}" if first else
              f"every layer within tolerance {args.tol:g} (relative)")
        ok = ok and first is None
    print(f"max |dlogit| {r['max_abs']:.2e}   mean KL {r['mean_kl']:.2e}   top-1 agreement "
          f"{agree}/{r['n_tokens']}   ({'ok' if ok else 'FAIL'}: tolerance {args.tol:g})")
    return 0 if ok else 1
