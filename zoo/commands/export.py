"""`zoo export SOURCE OUT.gguf`: a model (and its tokenizer) as a GGUF file for llama.cpp and Ollama."""
from pathlib import Path

from ..export import TYPES, check_destination, save_gguf, save_gguf_adapter
from ..lora import lora_layers, merge_lora
from ..sources import from_pretrained, source_path
from ..registry import PRESETS
from ..tokenizers import load_tokenizer

HELP = "write a model as a GGUF file for llama.cpp / Ollama"


def add_arguments(parser):
    parser.add_argument("source", help="a training output folder, Hugging Face folder, hub repo id, .gguf file or "
                                       "preset name (its pretrained weights)")
    parser.add_argument("out", help="the .gguf file to write (an existing one only with --overwrite)")
    parser.add_argument("--type", default="f16", choices=TYPES,
                        help="the matrices' type (norms and biases stay f32); default f16")
    parser.add_argument("--tokenizer", help="tokenizer source, for a SOURCE without one (a folder, .gguf, "
                                            "tokenizer.json, 'gpt2', ...)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="for a LoRA training output: write the adapter alone, as llama.cpp's LoRA GGUF "
                             "(apply it to the base's GGUF with llama-cli --lora); by default the adapter is "
                             "merged into the weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT (once the new file is complete)")


def run(args):
    if not str(args.out).endswith(".gguf"):
        raise ValueError(f"the output file should end in .gguf, not {args.out!r}")
    check_destination(args.out, args.overwrite, "--overwrite")  # (refused before the model is loaded)
    path = source_path(args.source)
    model = from_pretrained(path)  # (resolved once: a preset says where its weights come from once)
    if args.adapter_only:
        if not lora_layers(model):
            raise ValueError(f"{args.source} holds no LoRA adapter (--adapter-only is for a LoRA training output)")
        out = save_gguf_adapter(model, args.out, overwrite=args.overwrite)
        print(f"wrote {out} (LoRA adapter, {len(lora_layers(model))} layers)")
        return 0
    if lora_layers(model):
        model = merge_lora(model)
    # the source's own tokenizer (a preset's, a folder's, a GGUF's), else a LoRA run's base's
    base = getattr(model, "zoo_base", None)
    candidates = [args.tokenizer] if args.tokenizer else [
        args.source if args.source in PRESETS and not Path(args.source).exists() else path,
        *([base["source"]] if base else [])]
    for i, candidate in enumerate(candidates):
        try:
            tokenizer = load_tokenizer(candidate)
            break
        except FileNotFoundError as e:
            if args.tokenizer or i == len(candidates) - 1:
                raise FileNotFoundError(f"{e}; pass --tokenizer SOURCE (llama.cpp needs the vocabulary inside "
                                        "the file)") from None
    out = save_gguf(model, args.out, tokenizer=tokenizer, dtype=args.type, overwrite=args.overwrite)
    print(f"wrote {out} ({args.type}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
