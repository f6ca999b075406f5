"""`zoo serve` under load, side by side with `transformers serve` on the same weights, in one run.

SmolLM2-135M-Instruct (the packaged GGUF) is written once as a Hugging Face folder by zoo.save_pretrained, in
bf16 (with --dtype float32, for a CPU without bf16 arithmetic, in float32); both servers load that folder in that
dtype on the CPU. 1, 4 and 8 concurrent clients (the official openai package, one thread each, different prompts)
each stream one greedy chat answer of up to 128 tokens. For each server and load: aggregate tokens/s (all
clients' completion tokens, by each server's own usage count, over the wall time from the first request to the
last answer) and time to first token, p50 and p95. Servers and loads are interleaved round by round, so that the
machine's other work falls on both alike; the table gives each figure's range over the rounds, and the ratios
per round.

    python bench/serve.py                       # zoo and transformers serve --continuous-batching, 3 rounds
    python bench/serve.py --peer all            # and transformers serve without it (slow: one request at a time)
    python bench/serve.py --peer none --rounds 1
    python bench/serve.py --dtype float32       # an AVX2-only CPU: bf16 GEMMs are emulated there, on both sides
"""
import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

import zoo

PROMPTS = ["Write a long story about a dragon who learns to cook.", "Explain in detail how a steam engine works.",
           "Describe a day in the life of a medieval blacksmith.", "Write a long poem about the ocean at night.",
           "Explain photosynthesis to a ten-year-old, step by step.", "Tell the history of the bicycle at length.",
           "Write a detailed travel guide to an imaginary island.", "Describe how to plan a vegetable garden."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, command, port, log):
        self.name, self.port, self.base = name, port, f"http://127.0.0.1:{port}"
        self.log = open(log, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.error = None

    def wait(self, timeout=900):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.error = f"exited with {self.proc.returncode}: " + Path(self.log.name).read_text()[-2000:]
                return False
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return True
            time.sleep(1)
        self.error = "no answer on /health"
        return False

    def stop(self):
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.kill()


def load(server, model, clients, max_tokens):
    """(aggregate tokens/s, [time to first token of each client])"""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=1800)
    ttft, tokens, errors = [None] * clients, [0] * clients, []

    def ask(i):
        try:
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], temperature=0,
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if ttft[i] is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft[i] = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens[i] = chunk.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - reported in the table
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return sum(tokens) / wall, [t for t in ttft if t is not None] or [wall], sum(tokens)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def span(values, fmt="{:.1f}"):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--zoo-compile", action="store_true", help="also `zoo serve --compile` (read its later rounds)")
    parser.add_argument("--peer", choices=("cb", "plain", "all", "none"), default="cb",
                        help="cb: transformers serve --continuous-batching (its batching server, the default); "
                             "plain: transformers serve as it starts by default (one request at a time); all: both; "
                             "none: zoo alone")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="both servers' dtype (float32 on a CPU without bf16 arithmetic, e.g. AVX2 only)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        help="OMP_NUM_THREADS of each server (default: this process's, else every core)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    loads = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="zoo-bench-serve-"))
    folder = tmp / "smollm2-135m-instruct"
    model, tokenizer = zoo.load_source("smollm2-135m-instruct", dtype=args.dtype)
    zoo.save_pretrained(model, folder, tokenizer)
    del model
    name = str(folder)
    commands = {"zoo serve": [sys.executable, "-m", "zoo", "serve", name, "--dtype", args.dtype, "--max-batch",
                              str(max(loads))]}
    if args.zoo_compile:  # the decode step compiled for max-batch rows: the first round pays the compiling
        commands["zoo serve --compile"] = commands["zoo serve"] + ["--compile"]
    hf = [sys.executable, "-m", "transformers.cli.transformers", "serve", name, "--device", "cpu", "--dtype",
          args.dtype]
    # its continuous batching sizes its paged KV cache by a share of memory: left alone, it took 13.7 GB of this
    # 24 GB machine's RAM (and was killed for it); 2% (~0.5 GB) holds far more than 8 x (prompt + 128) tokens in bf16;
    # in float32 (transformers 5.25) 2% left it no cache blocks after its 8,192-token scratch ("num_sectors = -5")
    cb = ["--continuous-batching", "--cb-max-memory-percent", "0.02" if args.dtype == "bfloat16" else "0.05"]
    if args.peer in ("cb", "all"):
        commands["transformers serve --continuous-batching"] = hf + cb
    if args.peer in ("plain", "all"):
        commands["transformers serve"] = hf
    servers = []
    try:
        for label, command in commands.items():
            port = free_port()
            command = command + ["--port", str(port)] + (["--host", "127.0.0.1"] if "transformers" in label else [])
            servers.append(Server(label, command, port, tmp / f"{len(servers)}.log"))
        for s in servers:
            if s.wait():
                try:
                    load(s, name, max(loads), 8)  # warm up: the first requests allocate and load
                except RuntimeError as e:
                    s.error = str(e)
            if s.error:
                print(f"{s.name}: cannot run here: {s.error}", file=sys.stderr)
        live = [s for s in servers if not s.error]
        results = {(s.name, n): [] for s in live for n in loads}
        for r in range(args.rounds):
            for n in loads:
                for s in live:
                    if s.error:
                        continue
                    try:
                        results[s.name, n].append(load(s, name, n, args.max_tokens))
                    except RuntimeError as e:  # a server that died mid-run: say so, go on with the others
                        s.error = f"failed in round {r + 1} at {n} clients: {e}; log: {s.log.name}"
                        print(f"{s.name}: {s.error}", file=sys.stderr)
                        continue
                    tps, ttft, count = results[s.name, n][-1]
                    print(f"round {r + 1}: {s.name:>42}, {n} clients: {tps:6.1f} tok/s ({count} tokens), TTFT p50 "
                          f"{pct(ttft, .5):.2f} s p95 {pct(ttft, .95):.2f} s", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"\nSmolLM2-135M-Instruct, {args.dtype}, CPU ({args.threads} threads per server), {args.max_tokens} greedy tokens "
          f"per client, {args.rounds} rounds (ranges over rounds)\n")
    print("| server | clients | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---:|---:|---:|---:|")
    for s in live:
        for n in loads:
            if not (runs := results[s.name, n]):
                continue
            print(f"| {s.name} | {n} | {span([t for t, _, _ in runs])} | {span([pct(f, .5) for _, f, _ in runs], '{:.2f}')}"
                  f" | {span([pct(f, .95) for _, f, _ in runs], '{:.2f}')} |")
    zoo_name, top = "zoo serve", max(loads)
    if zoo_name in [s.name for s in live]:
        zoo_runs = results[zoo_name, top]
        if 1 in loads and zoo_runs:
            ratio = [a[0] / b[0] for a, b in zip(zoo_runs, results[zoo_name, 1])]
            print(f"\nzoo serve, {top} clients / 1 client, aggregate tok/s: {span(ratio, '{:.2f}')}x (goal >= 3x)")
        for ours in (s for s in live if s.name.startswith("zoo")):
            for peer in (s for s in live if not s.name.startswith("zoo")):
                if ratio := [a[0] / b[0] for a, b in zip(results[ours.name, top], results[peer.name, top])]:
                    print(f"{ours.name} / {peer.name} at {top} clients: {span(ratio, '{:.2f}')}x (goal >= 1.5x)")
    for s in servers:
        if s.error:
            print(f"\n{s.name} could not run here: {s.error[:500]}")


if __name__ == "__main__":
    main()
