"""Masked language modelling: BERT's 80/10/10 masking and its loss mask, special tokens in every tokenizer kind,
vocabulary growth, training (exact resume, pretrained init), evaluation, fill_mask and the commands, and a
copying task only bidirectional attention can learn."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo
from zoo import data, mlm, runs
from zoo.tokenizers import MASK_TOKEN, PAD_TOKEN, CharTokenizer, load_tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


def copy_lines(n, seed):
    """n lines of a random 8-letter word, a separator, and the same word again."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(LETTERS) for _ in range(8)) for _ in range(n)]
    return "".join(f"{w}|{w}\n" for w in words)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "copy.txt"
    path.write_text(copy_lines(600, seed=0))
    return str(path)


# ------------------------------------------------------------------------------------------ masking

def test_bert_proportions_and_only_selected_positions_count():
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(200)])  # 200 ordinary tokens
    tok.add_special_tokens(mask_token=MASK_TOKEN, pad_token=PAD_TOKEN)
    tokens = torch.randint(200, (20_000,), generator=torch.Generator().manual_seed(0))
    tokens[::50] = tok.pad_id  # special tokens are never selected
    examples = mlm.MaskedWindows(data.Windows(tokens.numpy(), 100), tok, mask_prob=0.15)
    index = examples.draw(torch.Generator().manual_seed(1), (400,))
    x, y = examples.batch(index)
    original, _ = data.Windows(tokens.numpy(), 100).batch(index[:, 0])
    selected = y != data.IGNORE
    # exactly round(15%) of each window's maskable tokens, never a special one; targets are the originals
    maskable = original != tok.pad_id
    assert torch.equal(selected.sum(1), (maskable.sum(1) * 0.15).round().long())
    assert not selected[~maskable].any() and torch.equal(y[selected], original[selected])
    assert torch.equal(x[~selected], original[~selected])  # nothing else changes
    # of the selected: 80% the mask token, 10% a random ordinary token (which may happen to be the original),
    # 10% unchanged, each within 4 standard deviations
    n = selected.sum().item()
    masked = (x[selected] == tok.mask_token_id).float().mean().item()
    changed = ((x[selected] != tok.mask_token_id) & (x[selected] != original[selected])).float().mean().item()
    kept = (x[selected] == original[selected]).float().mean().item()
    for share, p in ((masked, 0.8), (changed, 0.1 * 199 / 200), (kept, 0.1 + 0.1 / 200)):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (share, p)
    swapped = selected & (x != tok.mask_token_id) & (x != original)
    assert swapped.any() and (x[swapped] < 200).all()  # replacements are ordinary tokens, never a special one

    # the loss (training's cross-entropy with IGNORE) sees the selected positions only
    logits = torch.randn(*x.shape, tok.vocab_size, requires_grad=True)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=data.IGNORE)
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, selected)
    expected = -logits.log_softmax(-1)[selected].gather(1, y[selected][:, None]).mean()
    torch.testing.assert_close(loss, expected)

    # an example's masks follow its seed alone: the same index masks the same way, in any batch
    again_x, again_y = examples.batch(index[7:9])
    assert torch.equal(again_x, x[7:9]) and torch.equal(again_y, y[7:9])
    other = index.clone()
    other[:, 1] += 1
    assert not torch.equal(examples.batch(other)[1], y)
    assert torch.equal(examples.batch(examples.fixed(16))[0], examples.batch(examples.fixed(16))[0])


# ------------------------------------------------------------------------------------------ tokenizers

@pytest.fixture(params=["char", "bpe", "hf-folder", "gpt2"])
def tokenizer_kind(request, tmp_path):
    text = "hello world, a masked model"
    if request.param == "char":
        return CharTokenizer.from_text(text)
    if request.param == "bpe":
        return train_bpe([text] * 5, vocab_size=280)
    if request.param == "hf-folder":  # a tokenizer.json folder, as a hub download or transformers writes it
        train_bpe([text] * 5, vocab_size=280).save(tmp_path / "hf")
        return load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    request.getfixturevalue("gpt2_bpe")
    return load_tokenizer("gpt2")


def test_mask_and_pad_tokens_round_trip(tokenizer_kind, tmp_path):
    tok = tokenizer_kind
    n, plain = tok.vocab_size, tok.encode("hello world")
    assert tok.mask_token is None and tok.mask_token_id is None
    assert tok.add_special_tokens(mask_token=MASK_TOKEN, pad_token=PAD_TOKEN) == 2
    assert (tok.vocab_size, tok.mask_token_id, tok.pad_id, tok.mask_token) == (n + 2, n, n + 1, MASK_TOKEN)
    assert tok.add_special_tokens(mask_token=MASK_TOKEN) == 0 and tok.vocab_size == n + 2  # already there
    text = f"hello{MASK_TOKEN} world{PAD_TOKEN}{PAD_TOKEN}"
    ids = tok.encode(text)
    assert ids.count(n) == 1 and ids.count(n + 1) == 2 and tok.decode(ids) == text
    assert tok.encode("hello world") == plain  # ordinary text encodes as before
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert type(again) is type(tok)
    assert (again.vocab_size, again.mask_token_id, again.pad_id, again.mask_token) == (n + 2, n, n + 1, MASK_TOKEN)
    assert again.encode(text) == ids and again.decode(ids) == text


def test_saved_gpt2_tokenizer_with_a_mask_loads_in_transformers(tmp_path, gpt2_bpe, transformers):
    tok = load_tokenizer("gpt2")
    tok.add_special_tokens(mask_token=MASK_TOKEN, pad_token=PAD_TOKEN)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = f"Hello{MASK_TOKEN} world{PAD_TOKEN}<|endoftext|>"
    assert hf.encode(text) == tok.encode(text)
    assert (hf.mask_token_id, hf.pad_token_id, len(hf)) == (tok.mask_token_id, tok.pad_id, tok.vocab_size)


# ------------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("arch, config", [
    ("gpt2", dict(n_layer=1, n_head=2, n_embd=16)),  # tied head
    ("llama", dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_dim=32, tie_embeddings=False)),
])
def test_resize_vocab_keeps_the_old_tokens(arch, config):
    torch.manual_seed(0)
    model = zoo.build(arch, dict(config, vocab_size=40, block_size=16))
    idx = torch.randint(40, (2, 10))
    before = model(idx)
    mlm.resize_vocab(model, 43)
    after = model(idx)
    assert after.shape == (2, 10, 43) and model.config.vocab_size == 43
    torch.testing.assert_close(after[..., :40], before, rtol=0, atol=0)  # the old logits, bit for bit
    head = model.lm_head.weight
    assert head.shape == (43, 16) and (head is model.get_submodule(mlm.TOKEN_EMBEDDING[arch][0]).weight) == \
        (arch == "gpt2")
    new = torch.cat([p[40:].flatten() for p in {id(p): p for p in model.parameters() if p.shape[0] == 43}.values()])
    assert 0.01 < new.std().item() < 0.04  # drawn like the model's own init, N(0, 0.02)
    assert model(torch.tensor([[42, 41, 0]])).shape == (1, 3, 43)


def test_objective_and_attention_must_agree(tmp_path, text_file):
    common = dict(tokenizer="char", max_iters=1, block_size=16, batch_size=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match="mlm needs a model with attention"):
        zoo.train("bigram", [text_file], tmp_path / "a", objective="mlm", **common)
    with pytest.raises(ValueError, match="bidirectional"):
        zoo.train("shakespeare-char", [text_file], tmp_path / "b", overrides={"causal": False}, **common)
    with pytest.raises(ValueError, match="mask_prob"):
        zoo.TrainConfig(mask_prob=0.0)


# ------------------------------------------------------------------------------------------ training

TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=28)  # shakespeare-char (gpt2), shrunk
TINY = dict(block_size=32, batch_size=4, device="cpu", bf16=False, progress=False, tokenizer="char",
            objective="mlm")


def tiny(out, text_file, overrides=(), **fields):
    return zoo.train("shakespeare-char", [text_file], out, overrides={**TINY_MODEL, **dict(overrides)},
                     **{**TINY, **fields})


def val_losses(out):
    return [r["val_loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "val_loss" in r]


def test_mlm_run_builds_a_bidirectional_model_with_a_mask_token(tmp_path, text_file, capfd):
    loss = tiny(tmp_path / "o", text_file, max_iters=4, eval_interval=2)
    assert 0 < loss < 5
    assert "grew from 28 to 29 rows" in capfd.readouterr().err  # 28 characters and the mask
    model, tok = zoo.load_source(tmp_path / "o" / "step-0000004")
    assert model.config.causal is False and model.config.vocab_size == 29
    assert (tok.mask_token, tok.mask_token_id) == (MASK_TOKEN, 28)
    state = torch.load(tmp_path / "o" / "step-0000004" / runs.STATE_FILE, weights_only=True)
    assert state["settings"]["objective"] == "mlm" and state["settings"]["mask_prob"] == 0.15
    # --set causal=true: the decoder-style variant, same objective
    tiny(tmp_path / "c", text_file, overrides={"causal": True}, max_iters=2)
    assert zoo.from_pretrained(tmp_path / "c" / "step-0000002").config.causal is True


def test_mlm_resume_continues_exactly(tmp_path, text_file, monkeypatch):
    common = dict(overrides={"dropout": 0.1}, max_iters=12, eval_interval=3, checkpoint_interval=4, log_interval=2,
                  warmup=2, seed=7)
    tiny(tmp_path / "a", text_file, **common)

    class Crash(Exception):
        pass

    save = runs.save_checkpoint

    def save_then_crash(out, step, *rest, **kw):
        path = save(out, step, *rest, **kw)
        if step == 8:
            raise Crash
        return path
    monkeypatch.setattr(runs, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        tiny(tmp_path / "b", text_file, **common)
    monkeypatch.setattr(runs, "save_checkpoint", save)
    zoo.train("shakespeare-char", [text_file], tmp_path / "b", resume=True, progress=False)  # its own settings
    assert len(val_losses(tmp_path / "a")) == 4 and val_losses(tmp_path / "b") == val_losses(tmp_path / "a")
    a = load_file(tmp_path / "a" / "step-0000012" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step-0000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the masks mattered: another seed trains another model
    tiny(tmp_path / "s", text_file, **{**common, "seed": 8})
    s = load_file(tmp_path / "s" / "step-0000012" / "model.safetensors")
    assert not all(torch.equal(a[k], s[k]) for k in a)


def test_pretrained_causal_model_is_fine_tuned_bidirectionally(tmp_path, text_file, capfd):
    """A causal checkpoint (with its tokenizer) loads into a bidirectional model: the embedding and head
    grow by the mask token's row, noted on stderr, and the old weights are where training starts."""
    tok = CharTokenizer.from_text(open(text_file).read())
    torch.manual_seed(0)
    causal = zoo.build("llama", dict(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_kv_head=2,
                                     n_embd=16, ffn_dim=32))
    zoo.save_pretrained(causal, tmp_path / "causal", tokenizer=tok)
    zoo.train(None, [text_file], tmp_path / "o", init=str(tmp_path / "causal"), max_iters=1, lr=1e-9, warmup=0,
              **{k: v for k, v in TINY.items() if k != "tokenizer"})
    assert f"grew from {tok.vocab_size} to {tok.vocab_size + 1} rows" in capfd.readouterr().err
    model, again = zoo.load_source(tmp_path / "o" / "step-0000001")
    assert model.config.causal is False and again.mask_token_id == tok.vocab_size
    old, new = causal.state_dict(), model.state_dict()
    for k in old:
        torch.testing.assert_close(new[k][:old[k].shape[0]], old[k], rtol=0, atol=1e-6)  # lr 1e-9: unchanged


# ------------------------------------------------------------------------------------------ evaluation, fill_mask

@pytest.fixture
def mlm_checkpoint(tmp_path, text_file):
    tiny(tmp_path / "o", text_file, max_iters=4)
    return tmp_path / "o" / "step-0000004"


def test_fill_mask_is_the_softmax_at_each_mask_in_order(mlm_checkpoint):
    model, tok = zoo.load_source(mlm_checkpoint)
    text = f"abc{MASK_TOKEN}efgh|ab{MASK_TOKEN}defgh\n"
    out = zoo.fill_mask(model, tok, text, top_k=3)
    ids = tok.encode(text)
    where = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
    logits = model(torch.tensor([ids]))[0, where]
    logits[:, tok.mask_token_id] = float("-inf")  # the mask itself is no fill
    probs = logits.softmax(-1)
    assert len(out) == 2 and all(len(c) == 3 for c in out)
    for candidates, p in zip(out, probs):
        top = p.topk(3)
        assert [t for t, _ in candidates] == [tok.decode([i]) for i in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor([q for _, q in candidates]), top.values)
    assert all(MASK_TOKEN not in t for t, _ in zoo.fill_mask(model, tok, text, top_k=tok.vocab_size)[0])
    with pytest.raises(TypeError, match="text must be a str"):
        zoo.fill_mask(model, tok, [text])
    with pytest.raises(ValueError, match="no mask token"):
        zoo.fill_mask(model, tok, "abc")
    with pytest.raises(ValueError, match="no mask token"):
        zoo.fill_mask(model, CharTokenizer.from_text("abc|\n"), "abc")


@pytest.mark.slow
def test_eval_and_fill_mask_commands(mlm_checkpoint, text_file, zoo_main):
    model, tok = zoo.load_source(mlm_checkpoint)
    tokens = torch.from_numpy(data.tokenize(data.read_texts([text_file]), tok).astype(np.int64))
    loss, accuracy = mlm.masked_evaluation(model, tok, tokens, 32, batch_size=4, seed=0)
    args = ["eval", str(mlm_checkpoint), "--data", text_file, "--objective", "mlm", "--window", "32"]
    (code, first, err), (_, second, _) = zoo_main(*args), zoo_main(*args)
    assert code == 0, err
    assert first == second == f"masked_loss {loss:.4f} accuracy {accuracy:.4f}\n"  # the same masks
    assert mlm.masked_evaluation(model, tok, tokens, 32, seed=1) != (loss, accuracy)

    code, out, err = zoo_main("fill-mask", mlm_checkpoint, "--text", f"ab{MASK_TOKEN}d", "--top-k", "2")
    assert code == 0, err
    (candidates,) = zoo.fill_mask(model, tok, f"ab{MASK_TOKEN}d", top_k=2)
    assert out == "mask 1: " + "  ".join(f"{t!r} {p:.4f}" for t, p in candidates) + "\n"
    code, _, err = zoo_main("fill-mask", mlm_checkpoint, "--text", "abcd")
    assert code == 2 and "zoo fill-mask: error:" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ learning

@pytest.mark.slow
def test_only_bidirectional_attention_recovers_the_first_copy(tmp_path):
    """Lines "word|word": a masked letter of the first copy has its only evidence to its right. After the
    same short run, the bidirectional MLM model recovers it, the causal-attention one cannot beat chance."""
    path = tmp_path / "copy.txt"
    path.write_text(copy_lines(4000, seed=0))
    # A tiny llama (RoPE: copying at a fixed offset is easy to express; a low rope_theta makes offsets
    # of ~9 distinct). Training reads 200 x 32 windows, BERT's masking with a larger share (more targets
    # per step). One thread: this model is too small for two, and the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    accuracy = {}
    try:
        for causal in (False, True):
            out = tmp_path / f"causal-{causal}"
            zoo.train("smollm2-135m", [str(path)], out, tokenizer="char", objective="mlm", mask_prob=0.25,
                      overrides=dict(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, ffn_dim=256, vocab_size=29,
                                     block_size=36, rope_theta=10.0, causal=causal),
                      block_size=36, batch_size=32, max_iters=200, lr=5e-3, schedule="constant", warmup=20,
                      eval_interval=200, eval_iters=2, seed=1337, bf16=False, device="cpu", progress=False)
            model, tok = zoo.load_source(out / "step-0000200")
            rng, right = random.Random(1), 0
            for _ in range(n := 300):  # a new line after a previous one, one letter of its first copy masked
                word, i = "".join(rng.choice(LETTERS) for _ in range(8)), rng.randrange(8)
                text = copy_lines(1, seed=rng.random()) + word[:i] + MASK_TOKEN + word[i + 1:] + "|" + word + "\n"
                (candidates,) = zoo.fill_mask(model, tok, text, top_k=1)
                right += candidates[0][0] == word[i]
            accuracy[causal] = right / n
    finally:
        torch.set_num_threads(threads)
    print(f"\nfirst-copy letters recovered: bidirectional {accuracy[False]:.1%}, causal attention "
          f"{accuracy[True]:.1%} (chance {1 / 26:.1%})")
    assert accuracy[False] >= 0.9
    assert accuracy[True] < 0.15


@pytest.mark.slow
def test_two_processes_mask_their_own_shards_as_one_process_does(tmp_path, text_file, zoo_main):
    """Under DDP every rank draws the same global batch (window starts and mask seeds) and masks only its own
    rows: two processes train the model one process accumulating both halves trains."""
    common = ["train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", "--objective", "mlm",
              "--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32", "--set", "vocab_size=29",
              "--block-size", "32", "--batch-size", "4", "--device", "cpu", "--no-bf16", "--no-progress",
              "--max-iters", "3", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "0"]
    code, _, err = zoo_main(*common, "--out", tmp_path / "one")
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "zoo", *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "step-0000003" / "model.safetensors")
    b = load_file(tmp_path / "two" / "step-0000003" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_command_help_shows_the_objective(zoo_main):
    for command, flags in (("train", ("--objective {causal,mlm,dpo}", "--mask-prob")),
                           ("eval", ("--objective {causal,mlm}", "--mask-prob", "--seed")),
                           ("fill-mask", ("--text", "--top-k"))):
        code, out, err = zoo_main(command, "--help")
        assert code == 0 and all(f in out for f in flags), err
