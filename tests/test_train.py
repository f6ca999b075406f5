"""Training: token files and batches, schedules, the loop's proofs (bigram entropy, exact resume, DDP),
checkpoints, and the `zoo train` command line."""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo import data
from zoo import training as zt
from zoo.tokenizers import CharTokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def markov_text(n, seed=0, alphabet="abcdefghij \n"):
    """n characters from a random first-order Markov chain: a text with a known bigram structure."""
    rng = random.Random(seed)
    weights = {a: [rng.random() ** 3 for _ in alphabet] for a in alphabet}
    out, c = [], alphabet[0]
    for _ in range(n):
        c = rng.choices(alphabet, weights[c])[0]
        out.append(c)
    return "".join(out)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(markov_text(20_000))
    return str(path)


def parse(argv):
    p = argparse.ArgumentParser()
    zt.add_arguments(p)
    return p.parse_args(argv)


TINY = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32", "--set", "vocab_size=12",
        "--block-size", "32", "--batch-size", "4", "--device", "cpu", "--no-bf16"]


# ------------------------------------------------------------------------------------------ data

def test_token_file_is_cached_and_keyed_by_content_and_tokenizer(tmp_path):
    tok = CharTokenizer.from_text("abc")
    a = data.tokenize(["abcabc", "cab"], tok)
    assert a.dtype == np.uint16 and a.tolist() == [0, 1, 2, 0, 1, 2, 2, 0, 1]  # no end-of-text in chars
    assert len(os.listdir(data.cache_dir())) == 1
    again = data.tokenize(["abcabc", "cab"], tok)
    assert again.filename == a.filename  # read back, not tokenized again
    data.tokenize(["abcabc", "cbb"], tok)  # other text
    data.tokenize(["abcabc", "cab"], CharTokenizer.from_text("abcd"))  # same ids, other tokenizer
    assert len(os.listdir(data.cache_dir())) == 3


def test_documents_are_joined_with_end_of_text():
    tok = zoo.tokenizer("gpt2")
    ids = data.tokenize(["Hello world", "Hello world"], tok)
    assert ids.tolist() == [15496, 995, 50256, 15496, 995]


def test_uint32_when_the_vocabulary_needs_it():
    tok = CharTokenizer(list("ab"))
    tok.vocab_size = 70_000
    assert data.tokenize(["abba"], tok).dtype == np.uint32


def test_validation_is_the_last_tenth(text_file):
    tok = CharTokenizer.from_text(open(text_file).read())
    train, val = data.load_splits([text_file], tok, block_size=8)
    assert len(train) == 18_000 and len(val) == 2_000
    assert np.array_equal(np.concatenate([train, val]), tok.encode(open(text_file).read()))


def test_batches_are_shifted_windows():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = data.windows(tokens, torch.randint(100 - 8, (5,)), 8)
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and int(y.max()) <= 99


def test_too_little_data_and_vocab_mismatch_fail_before_training(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    tok = CharTokenizer.from_text("abcdefghij")
    with pytest.raises(ValueError, match="block-size"):
        data.load_splits([str(short)], tok, block_size=8)  # validation: 3 tokens < 9
    with pytest.raises(ValueError, match="vocab_size=10"):
        data.load_splits([str(short)], tok, block_size=2, vocab_size=5)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="0 tokens"):
        data.load_splits([str(empty)], tok, block_size=2)
    with pytest.raises(ValueError, match="vocab_size"):
        zt.train(parse(["shakespeare-char", "--data", str(short), "--out", str(tmp_path / "o"),
                        "--tokenizer", "char", "--set", "vocab_size=4", "--block-size", "2"]))


def test_hf_dataset_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'zoo\[datasets\]'"):
        data.read_texts(["hf:wikitext:wikitext-2-raw-v1"])


def test_hf_dataset_splits_train_a_model(tmp_path, monkeypatch):
    """A local dataset folder read through `datasets` (a hub name takes the same path, online)."""
    datasets = pytest.importorskip("datasets", reason="the `datasets` package (pip install 'zoo[datasets]') is not "
                                                      "installed")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # away from the user's
    folder = tmp_path / "runs@2" / "ds"  # an "@" in a path is not a split
    folder.mkdir(parents=True)
    for split, n in (("train", 30), ("validation", 5)):
        rows = [{"text": markov_text(200, seed=i)} for i in range(n)] + [{"text": ""}]  # empty rows are dropped
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"hf:{folder}"
    assert data.read_texts([spec]) == [markov_text(200, seed=i) for i in range(30)]
    assert data.read_texts([spec + "@validation"]) == [markov_text(200, seed=i) for i in range(5)]
    with pytest.raises(ValueError, match="test"):
        data.read_texts([spec + "@test"])
    val_loss = zt.train(parse(["shakespeare-char", "--data", spec, "--val", spec + "@validation", "--tokenizer", "char",
                               "--out", str(tmp_path / "out"), "--max-iters", "3", *TINY]))
    assert math.isfinite(val_loss)


# ------------------------------------------------------------------------------------------ loop parts

def test_noam_and_cosine_schedules():
    s = zt.settings_from(parse(["scratchformer", "--data", "x", "--out", "o"]))
    d = 512
    assert zt.learning_rate(s, 1, None, d) == pytest.approx(d ** -0.5 * 4000 ** -1.5)
    assert zt.learning_rate(s, 4000, None, d) == pytest.approx(d ** -0.5 * 4000 ** -0.5)  # the peak
    assert zt.learning_rate(s, 16000, None, d) == pytest.approx(d ** -0.5 * 16000 ** -0.5)
    c = zt.settings_from(parse(["shakespeare-char", "--data", "x", "--out", "o", "--lr", "1", "--min-lr", "0.1",
                                "--warmup", "10"]))
    assert zt.learning_rate(c, 5, 110, 1) == pytest.approx(0.5)
    assert zt.learning_rate(c, 10, 110, 1) == pytest.approx(1.0)
    assert zt.learning_rate(c, 60, 110, 1) == pytest.approx(0.55)
    assert zt.learning_rate(c, 110, 110, 1) == pytest.approx(0.1)


def test_scratchformer_preset_carries_its_reference_recipe():
    s = zt.settings_from(parse(["scratchformer", "--data", "x", "--out", "o"]))
    assert (s.schedule, s.warmup, s.label_smoothing, s.batch_size, s.block_size, s.checkpoint_interval,
            s.tokenizer) == ("noam", 4000, 0.1, 10, 256, 10000, "gpt2")
    s = zt.settings_from(parse(["scratchformer", "--data", "x", "--out", "o", "--warmup", "8"]))
    assert s.warmup == 8  # the command line wins


def test_scratchformer_trains_with_its_recipe(tmp_path, text_file):
    """GPT-2's BPE, the Noam schedule and label smoothing, on a tiny scratchformer."""
    zt.train(parse(["scratchformer", "--data", text_file, "--out", str(tmp_path / "o"), "--set", "n_layer=1",
                    "--set", "n_embd=32", "--set", "n_head=2", "--set", "ffn_dim=64", "--block-size", "32",
                    "--batch-size", "2", "--max-iters", "3", "--log-interval", "1", "--device", "cpu"]))
    rows = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([32 ** -0.5 * t * 4000 ** -1.5 for t in (1, 2, 3)])
    assert zoo.tokenizer(str(tmp_path / "o" / "step-0000003")).vocab_size == 50257


def test_weight_decay_only_on_matrices():
    model = zoo.load("shakespeare-char", n_layer=1, bias=True)
    s = zt.settings_from(parse(["shakespeare-char", "--data", "x", "--out", "o"]))
    decay, no_decay = zt.make_optimizer(model, s, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------ proofs

def test_bigram_reaches_the_conditional_entropy(tmp_path, text_file):
    text = open(text_file).read()
    pairs, firsts = Counter(zip(text, text[1:])), Counter(text[:-1])
    n = len(text) - 1
    entropy = -sum(c / n * math.log(c / firsts[a]) for (a, _), c in pairs.items())  # nats per token
    args = parse(["bigram", "--data", text_file, "--val", text_file, "--out", str(tmp_path / "o"),
                  "--tokenizer", "char", "--set", "vocab_size=12", "--batch-size", "32", "--block-size", "64",
                  "--lr", "0.1", "--min-lr", "0.001", "--weight-decay", "0", "--max-iters", "300",
                  "--warmup", "10", "--eval-interval", "1000", "--device", "cpu"])
    zt.train(args)
    model = zoo.from_pretrained(str(tmp_path / "o" / "step-0000300"))
    ids = torch.tensor(CharTokenizer.from_text(text).encode(text))
    loss = torch.nn.functional.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()
    assert loss == pytest.approx(entropy, rel=0.01)


def test_resume_continues_exactly(tmp_path, text_file, monkeypatch, capsys):
    common = ["shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY, "--set", "dropout=0.1",
              "--max-iters", "12", "--eval-interval", "3", "--checkpoint-interval", "4", "--log-interval", "2",
              "--warmup", "2", "--seed", "7"]
    zt.train(parse([*common, "--out", str(tmp_path / "a")]))
    straight = [line for line in capsys.readouterr().out.splitlines() if "val_loss" in line]

    class Crash(Exception):
        pass

    save = zt.save_checkpoint

    def save_then_crash(out, step, *rest):
        path = save(out, step, *rest)
        if step == 8:
            raise Crash
        return path
    monkeypatch.setattr(zt, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        zt.train(parse([*common, "--out", str(tmp_path / "b")]))
    monkeypatch.setattr(zt, "save_checkpoint", save)
    zt.train(parse([*common, "--out", str(tmp_path / "b"), "--resume"]))
    resumed = [line for line in capsys.readouterr().out.splitlines() if "val_loss" in line]
    assert len(straight) == 4 and resumed == straight
    a = load_file(tmp_path / "a" / "step-0000012" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step-0000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def rows(run):  # the log without its timings
        return [{k: v for k, v in json.loads(line).items() if k != "tok_per_s"}
                for line in open(tmp_path / run / "log.jsonl")]
    assert rows("b") == rows("a")


def test_checkpoint_contents_load_with_weights_only(tmp_path, text_file):
    zt.train(parse(["shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY, "--max-iters", "2",
                    "--out", str(tmp_path / "o")]))
    ckpt = tmp_path / "o" / "step-0000002"
    state = torch.load(ckpt / zt.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and state["arch"] == "gpt2" and state["config"]["n_embd"] == 32
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"} and "state" in state["optimizer"]
    model = zoo.from_pretrained(str(ckpt))
    assert model.config.n_embd == 32
    assert zoo.tokenizer(str(ckpt)).vocab_size == 12
    assert not [d for d in os.listdir(tmp_path / "o") if d.startswith(".tmp")]
    assert (tmp_path / "o" / "log.jsonl").exists() and (tmp_path / "o" / "loss.png").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(*a, **k):  # the training loss turns NaN from the 5th step on
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 4 and torch.is_grad_enabled() else loss
    monkeypatch.setattr(zt.F, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="step-0000004"):
        zt.train(parse(["shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY,
                        "--max-iters", "10", "--checkpoint-interval", "2", "--log-interval", "1",
                        "--out", str(tmp_path / "o")]))
    assert sorted(os.listdir(tmp_path / "o")) == ["log.jsonl", "loss.png", "step-0000002", "step-0000004"]
    model = zoo.from_pretrained(str(tmp_path / "o" / "step-0000004"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_starts_from_pretrained_weights(tmp_path, text_file, capsys):
    zt.train(parse(["shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY, "--max-iters", "20",
                    "--lr", "3e-3", "--out", str(tmp_path / "a")]))
    before = float(capsys.readouterr().out.split()[-1])
    # one step at a vanishing learning rate: the model (and its validation loss) is the one loaded
    val = zt.train(parse(["shakespeare-char", "--data", text_file, "--init", str(tmp_path / "a" / "step-0000020"),
                          "--max-iters", "1", "--lr", "1e-12", "--warmup", "0", "--block-size", "32",
                          "--batch-size", "4", "--device", "cpu", "--no-bf16", "--out", str(tmp_path / "b")]))
    assert val == pytest.approx(before, abs=1e-4) and before < math.log(12)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_label_smoothing_grad_accum(tmp_path, text_file, device):
    val = zt.train(parse(["shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY,
                          "--device", device, "--bf16", "--label-smoothing", "0.1", "--grad-accum", "2",
                          "--max-iters", "30", "--lr", "3e-3", "--out", str(tmp_path / "o")]))
    assert val < math.log(12) - 0.1  # learned something


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, text_file, device):
    """--compile trains the same model: fp32 losses equal the eager run's to float rounding."""
    args = ["shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY, "--device", device.type,
            "--max-iters", "20", "--eval-interval", "10", "--lr", "3e-3"]
    eager = zt.train(parse([*args, "--out", str(tmp_path / "eager")]))
    compiled = zt.train(parse([*args, "--compile", "--out", str(tmp_path / "compiled")]))
    assert compiled == pytest.approx(eager, rel=1e-4) and eager < math.log(12) - 0.1
    assert zoo.from_pretrained(str(tmp_path / "compiled" / "step-0000020")).config.n_layer == 1  # clean names


# ------------------------------------------------------------------------------------------ processes

def zoo_cmd(*args, launcher=(sys.executable, "-m", "zoo"), timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_command_line_train_then_eval(tmp_path, text_file):
    out = tmp_path / "o"
    r = zoo_cmd("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY,
                "--max-iters", "6", "--checkpoint-interval", "3", "--out", str(out))
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("val_loss ") and float(last.split()[1]) < 3.0
    r = zoo_cmd("eval", str(out), "--data", text_file, "--split", "val", "--window", "32", "--stride", "16")
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["step-0000003", "step-0000006"]
    assert all(line.split()[1:4:2] == ["loss", "ppl"] for line in lines)
    loss, ppl = float(lines[-1].split()[2]), float(lines[-1].split()[4])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)


@pytest.mark.slow
def test_time_budget_bounds_the_whole_command(tmp_path, text_file):
    t = time.time()
    r = zoo_cmd("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY,
                "--time-budget", "15", "--eval-interval", "50", "--out", str(tmp_path / "o"))
    wall = time.time() - t
    assert wall < 15.5, wall  # (the slack: process teardown on a busy machine)
    assert r.stdout.strip().splitlines()[-1].startswith("val_loss ")
    steps = [int(d[5:]) for d in os.listdir(tmp_path / "o") if d.startswith("step-")]
    assert max(steps) > 20  # it trained for most of the budget, not just stopped


@pytest.mark.slow
def test_two_processes_match_one_over_the_same_global_batch(tmp_path, text_file):
    common = ["train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY,
              "--max-iters", "3", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "0"]
    zoo_cmd(*common, "--out", str(tmp_path / "one"))
    zoo_cmd(*common, "--out", str(tmp_path / "two"),
            launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoo"))
    one = load_file(tmp_path / "one" / "step-0000003" / "model.safetensors")
    two = load_file(tmp_path / "two" / "step-0000003" / "model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
