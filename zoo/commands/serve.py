"""`zoo serve [SOURCE]`: any zoo source over the OpenAI HTTP API, concurrent requests decoded in one batch,
with a chat page at / (FastAPI and uvicorn: pip install 'zoo-lm[serve]')."""
import errno
import os
import socket
import sys

import torch

from ..engine import Engine
from ..prepack import prepack
from ..sources import describe_source
from .generate import add_model_arguments, load_model

HELP = "serve a model over the OpenAI HTTP API, with a chat page (default model: smollm2-135m-instruct)"


def add_arguments(parser):
    parser.add_argument("source", nargs="?", default="smollm2-135m-instruct",
                        help="a preset name (its pretrained weights), a hub repo id, a folder or a .gguf file "
                             "(default: smollm2-135m-instruct); clients ask for it by this name, unless "
                             "--served-model-name gives another")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model's name in the API (/v1/models, the requests' and answers' `model`), as "
                             "vLLM's flag (default: SOURCE as given, which for a file is its path)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1; "
                                                           "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting beyond those, after which the server answers 503 (default: 64)")
    add_model_arguments(parser)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step: faster per token after a first minute of compiling, in "
                             "float32 (in bfloat16 on the CPU the default step, over prepacked weights, is faster)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding with drafts copied from each request's text (n-gram lookup): "
                             "the same answers, faster where they quote their input")
    parser.add_argument("--num-draft", type=int, help="tokens drafted per step with --prompt-lookup (default: 10)")
    parser.add_argument("--api-key", default=os.environ.get("ZOO_API_KEY"),
                        help="require this bearer token on /v1/ (default: $ZOO_API_KEY, else none)")


def run(args):
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn ({e}): pip install 'zoo-lm[serve]'") from None

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], not {args.port}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty: it is the name clients ask for")
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, not {args.max_batch} and {args.max_queue}")
    if args.num_draft is not None and (args.num_draft < 1 or not args.prompt_lookup):
        raise ValueError(f"--num-draft sets the tokens --prompt-lookup drafts per step: give --prompt-lookup and a "
                         f"number >= 1, not {args.num_draft}")
    check_port(args.host, args.port)  # before the load and the announcement (another server may still take it)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args, device)
    # oneDNN's reordered weights (zoo/prepack.py); with --compile only a quantized model's copies for prompts (the
    # compiled step cannot trace reordered float layers: it fuses its own)
    prepack(model, linear=not args.compile)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, compile=args.compile,
                    draft="prompt-lookup" if args.prompt_lookup else None, num_draft=args.num_draft)
    name = args.served_model_name or args.source
    app = create_app(engine, name, api_key=args.api_key)
    dtype = args.dtype + (f" ({args.quantize} weights)" if args.quantize else "")
    print(f"zoo serve: {describe_source(args.source)} as {name!r}, {dtype} on {device}; OpenAI API at "
          f"http://{args.host}:{args.port}/v1, chat page at http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    # on Ctrl-C, open answers get 5 s to end before they are cut (uvicorn's default waits for them all)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def check_port(host, port):
    """Refuse a --host/--port that cannot be listened on, binding it as uvicorn will (then letting it go)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as uvicorn binds: the lingering connections of a server that just stopped do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use; pick another --port") from None
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") \
                from None
