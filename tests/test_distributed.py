"""Training past one process: FSDP2 against one process over the same global batch, FSDP checkpoints and
exact resume, activation checkpointing, DDP's default micro-batches, and a 2-node torchrun on localhost."""
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo import runs
from zoo import training as zt
from zoo.distributed import blocks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MODEL = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=12)  # shakespeare-char, shrunk
MODEL_ARGV = [arg for k, v in MODEL.items() for arg in ("--set", f"{k}={v}")]
SETTINGS = dict(block_size=32, batch_size=4, device="cpu", bf16=False, progress=False, tokenizer="char",
                lr=1e-2, schedule="constant", warmup=0, eval_interval=3, eval_iters=2, log_interval=1)
SETTINGS_ARGV = ["--block-size", "32", "--batch-size", "4", "--device", "cpu", "--no-bf16", "--no-progress",
                 "--tokenizer", "char", "--lr", "1e-2", "--schedule", "constant", "--warmup", "0",
                 "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1"]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "text.txt"
    path.write_text("".join(rng.choice("abcdefghij \n") for _ in range(20_000)))
    return str(path)


def torchrun(*args, nproc=2, extra=(), timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *(extra or ["--standalone"]), f"--nproc_per_node={nproc}",
           "-m", "zoo", "train", "shakespeare-char", *MODEL_ARGV, *SETTINGS_ARGV, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(run, step):
    return load_file(os.path.join(run, f"step-{step:07d}", "model.safetensors"))


def val_losses(run):
    return [r["val_loss"] for r in map(json.loads, open(os.path.join(run, "log.jsonl"))) if "val_loss" in r]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, text_file):
    """2 FSDP ranks, each taking half of every global batch, end where one process over the whole batch ends;
    the checkpoint rank 0 writes is the full model (from_pretrained reads it); resuming an FSDP run onto the
    same ranks continues exactly."""
    one = tmp_path / "one"
    zoo.train("shakespeare-char", [text_file], one, overrides=MODEL, max_iters=6, grad_accum=2,
              checkpoint_interval=3, **SETTINGS)
    fsdp = tmp_path / "fsdp"
    torchrun("--data", text_file, "--out", str(fsdp), "--fsdp", "--max-iters", "6", "--checkpoint-interval", "3")
    assert_same_weights(weights(one, 6), weights(fsdp, 6))
    assert val_losses(fsdp) == pytest.approx(val_losses(one), abs=1e-5) and len(val_losses(one)) == 2
    loaded = zoo.from_pretrained(str(fsdp / "step-0000006")).state_dict()
    for name, t in weights(fsdp, 6).items():  # the folder reads back as the gathered tensors
        assert torch.equal(loaded[name], t), name
    state = torch.load(fsdp / "step-0000006" / runs.STATE_FILE, weights_only=True)
    assert state["settings"]["fsdp"] and "transformer.wte.weight" in state["optimizer"]["state"]  # full, by name

    split = tmp_path / "split"
    torchrun("--data", text_file, "--out", str(split), "--fsdp", "--max-iters", "3", "--checkpoint-interval", "3")
    torchrun("--data", text_file, "--out", str(split), "--resume", "--max-iters", "6")
    assert val_losses(split) == val_losses(fsdp)
    assert_same_weights(weights(fsdp, 6), weights(split, 6), atol=0)


@pytest.mark.slow
def test_ddp_takes_one_micro_batch_per_process_by_default(tmp_path, text_file):
    one = tmp_path / "one"
    zoo.train("shakespeare-char", [text_file], one, overrides=MODEL, max_iters=2, grad_accum=2, **SETTINGS)
    torchrun("--data", text_file, "--out", str(tmp_path / "ddp"), "--max-iters", "2")  # no --grad-accum
    assert_same_weights(weights(one, 2), weights(tmp_path / "ddp", 2))


def test_fsdp_without_torchrun_is_refused(tmp_path, text_file):
    with pytest.raises(ValueError, match="torchrun"):
        zoo.train("shakespeare-char", [text_file], tmp_path / "o", overrides=MODEL, fsdp=True, **SETTINGS)


def saved_tensors(model):
    """How many tensors a forward pass saves for the backward."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 50, (3, 32)))
    return count


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mqa", "scratchformer"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(arch):
    config = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    if arch == "llama":
        config.update(n_kv_head=1, ffn_dim=48)
    if arch in ("mqa", "scratchformer"):
        config.update(ffn_dim=48)
    torch.manual_seed(0)
    plain = zoo.build(arch, config)
    ckpt = zoo.build(arch, config)
    ckpt.load_state_dict(plain.state_dict())
    zt.checkpoint_blocks(ckpt)
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]  # same names
    assert not any("forward" in vars(b) for b in blocks(ckpt))  # the blocks untouched: hooks, no patched forward
    assert saved_tensors(ckpt) < saved_tensors(plain) / 2  # and their activations are not kept
    x = torch.randint(0, 50, (3, 32))
    losses = []
    for model in (plain, ckpt):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert len(blocks(ckpt)) == 2


def test_grad_checkpoint_trains_the_same_run(tmp_path, text_file):
    plain = zoo.train("shakespeare-char", [text_file], tmp_path / "a", overrides=MODEL, max_iters=4, **SETTINGS)
    ckpt = zoo.train("shakespeare-char", [text_file], tmp_path / "b", overrides=MODEL, max_iters=4,
                     grad_checkpoint=True, **SETTINGS)
    assert ckpt == pytest.approx(plain, rel=1e-6)
    assert_same_weights(weights(tmp_path / "a", 4), weights(tmp_path / "b", 4), atol=1e-6)


def test_grad_checkpoint_in_bf16_on_short_blocks(tmp_path, text_file):
    """bf16 on the CPU with blocks of <= 128 tokens, where the forward pass picks SDPA's math kernel: the blocks'
    recomputation in the backward pass must pick the kernel the forward did (else torch's checkpoint refuses)."""
    settings = {**SETTINGS, "bf16": True}
    plain = zoo.train("shakespeare-char", [text_file], tmp_path / "a", overrides=MODEL, max_iters=2, **settings)
    ckpt = zoo.train("shakespeare-char", [text_file], tmp_path / "b", overrides=MODEL, max_iters=2,
                     grad_checkpoint=True, **settings)
    assert ckpt == pytest.approx(plain, rel=1e-2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_exit_cleanly(tmp_path, text_file):
    """Two torchrun launchers (one process each) meet through c10d rendezvous, as two machines would (FSDP with
    activation checkpointing, both at once)."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", "--rdzv-id=zoo-test", "-m", "zoo", "train", "shakespeare-char",
           *MODEL_ARGV, *SETTINGS_ARGV, "--data", text_file, "--out", str(tmp_path / "run"), "--max-iters", "2",
           "--fsdp", "--grad-checkpoint"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    assert sum(out.strip().splitlines()[-1].startswith("val_loss") for out, _ in outs if out.strip()) == 1
    assert (tmp_path / "run" / "step-0000002" / "model.safetensors").exists()
