"""`zoo inspect [SOURCE] --prompt TEXT --logit-lens | --attention LAYER`: look inside a model on one prompt.

    zoo inspect smollm2-135m-instruct --prompt "The capital of France is" --logit-lens
    zoo inspect smollm2-135m-instruct --prompt "The capital of France is" --attention 3 --head 5

--logit-lens prints each layer's top token at each position (zoo.logit_lens) and writes logit_lens.png;
--attention writes attention_layer<L>.png, one heatmap per head (zoo.trace's patterns). The PNGs need
matplotlib (pip install "zoo-lm[plot]").
"""
from pathlib import Path

import torch

from ..atomic import write_file
from ..inspection import blocks, logit_lens, trace
from ..sources import load_source

HELP = "look inside a model: the logit lens, attention patterns (default model: smollm2-135m-instruct)"


def add_arguments(parser):
    parser.add_argument("source", nargs="?", default="smollm2-135m-instruct",
                        help="a preset name (its pretrained weights), a hub repo id, a folder or a .gguf file "
                             "(default: smollm2-135m-instruct)")
    parser.add_argument("--prompt", required=True, help="the text to run the model on")
    parser.add_argument("--logit-lens", action="store_true",
                        help="each layer's residual stream through the final norm and head: its top token per "
                             "position, printed and drawn (logit_lens.png)")
    parser.add_argument("--attention", type=int, metavar="LAYER",
                        help="draw this layer's attention patterns, one heatmap per head (attention_layer<L>.png)")
    parser.add_argument("--head", type=int, help="with --attention: this head alone")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs (default: here)")
    parser.add_argument("--force", action="store_true", help="replace PNGs that are already there")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cpu)")


def run(args):
    # checked before the load
    if args.head is not None and args.attention is None:
        raise ValueError("--head selects a head of --attention LAYER's; pass --attention too")
    if not args.logit_lens and args.attention is None:
        raise ValueError("nothing to inspect: pass --logit-lens and/or --attention LAYER")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: --out names a folder for the PNGs (made if missing)")
    model, tokenizer = load_source(args.source, device=args.device, dtype="float32")
    n_layer, n_head = model.config.n_layer, model.config.n_head
    if args.attention is not None and not 0 <= args.attention < n_layer:
        raise ValueError(f"--attention {args.attention}: this model's layers are 0..{n_layer - 1}")
    if args.head is not None and not 0 <= args.head < n_head:
        raise ValueError(f"--head {args.head}: this model's heads are 0..{n_head - 1}")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt gives no tokens")
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    tokens = [tokenizer.decode([t]) for t in ids]
    plt = _pyplot()
    if args.logit_lens:
        probs = logit_lens(model, idx)[:, 0].float().softmax(-1)  # [n_layer + 1, T, vocab]
        p, top = probs.max(-1)  # [n_layer + 1, T]
        rows = ["embeddings", *(f"layer {i}" for i in range(n_layer))]
        table = [[f"{tokenizer.decode([t])!r} {q:.2f}" for t, q in zip(r.tolist(), s.tolist())] for r, s in zip(top, p)]
        width = max(14, *(len(c) for row in table for c in row))
        print(f"{'':<12}" + "".join(f"{t!r:<{width + 2}.{width}}" for t in tokens))
        for name, row in zip(rows, table):
            print(f"{name:<12}" + "".join(f"{c:<{width + 2}.{width}}" for c in row))
        words = [[tokenizer.decode([t]) for t in r] for r in top.tolist()]
        _save(_lens_figure(plt, p.cpu(), words, rows, tokens), args.out / "logit_lens.png", args.force, plt)
    if args.attention is not None:
        acts = trace(model, idx, [f"{blocks(model)[0]}.{args.attention}"], attention=True)
        pattern = next(v for k, v in acts.items() if k.endswith(".pattern"))[0].cpu()  # [H, T, T]
        heads = [args.head] if args.head is not None else list(range(n_head))
        for h in heads:  # where each head's last position looks
            j = int(pattern[h, -1].argmax())
            print(f"layer {args.attention} head {h}: the last token attends most to {tokens[j]!r} "
                  f"(position {j}, {pattern[h, -1, j]:.2f})")
        suffix = f"_head{args.head}" if args.head is not None else ""
        figure = _attention_figure(plt, pattern, heads, tokens, args.attention)
        _save(figure, args.out / f"attention_layer{args.attention}{suffix}.png", args.force, plt)
    return 0


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError('the PNGs need matplotlib: pip install "zoo-lm[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _lens_figure(plt, p, words, rows, tokens):
    """Layers up the page, positions across; each cell the layer's top token, coloured by its probability."""
    L, T = p.shape
    fig, ax = plt.subplots(figsize=(1.3 * T + 2.5, 0.26 * L + 1.2))
    image = ax.imshow(p.numpy(), aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1)
    for i in range(L):
        for j in range(T):
            ax.text(j, i, words[i][j].strip()[:10] or repr(words[i][j])[1:-1].replace(" ", "␣"), ha="center", va="center", fontsize=7,
                    color="white" if p[i, j] > 0.6 else "black")
    ax.set_xticks(range(T), [repr(t)[1:-1] for t in tokens], fontsize=8)
    ax.set_yticks(range(L), rows, fontsize=7)
    ax.set_title("logit lens: each layer's top next token (colour: its probability)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return fig


def _attention_figure(plt, pattern, heads, tokens, layer):
    """One query-by-key heatmap per head."""
    cols = min(len(heads), 3)
    rows = -(-len(heads) // cols)
    size = 1.6 + 0.35 * len(tokens)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    labels = [repr(t)[1:-1] for t in tokens]
    for ax, h in zip(axes.flat, heads):
        ax.imshow(pattern[h].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {h}", fontsize=9)
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), labels, fontsize=7)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    fig.supxlabel("key (attended to)", fontsize=8)
    fig.supylabel("query", fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig, path, force, plt):
    """Write the PNG (atomically); an existing file only with --force."""
    try:
        if path.exists() and not force:
            raise ValueError(f"{path} exists: pass --force to replace it, or --out another folder")
        write_file(path, lambda f: fig.savefig(f, format="png", dpi=90, bbox_inches="tight"))
    finally:
        plt.close(fig)
    print(f"wrote {path}")
