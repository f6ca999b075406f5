"""Training: token files and batches, schedules, the loop's proofs (bigram entropy, exact resume, DDP),
checkpoints, and the `zoo train` command line."""
import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny as tiny_model
from safetensors.torch import load_file

import zoo
import zoo.registry
from zoo import data, runs
from zoo import training as zt
from zoo.loss import HeadLoss, hidden_state, target_logps
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


TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=12)  # shakespeare-char, shrunk
TINY = dict(block_size=32, batch_size=4, device="cpu", bf16=False, progress=False)
TINY_ARGV = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32", "--set", "vocab_size=12",
             "--block-size", "32", "--batch-size", "4", "--device", "cpu", "--no-bf16", "--no-progress"]


def tiny(out, text_file, preset="shakespeare-char", overrides=(), **fields):
    """zoo.train on a tiny character model; `fields` replace TINY's settings."""
    return zoo.train(preset, [text_file], out, overrides={**TINY_MODEL, **dict(overrides)},
                     **{**TINY, "tokenizer": "char", **fields})


def val_losses(out):
    return [r["val_loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "val_loss" in r]


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


def test_documents_are_joined_with_end_of_text(gpt2_bpe):
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
    with pytest.raises(ValueError, match="block_size"):
        data.load_splits([str(short)], tok, block_size=8)  # validation: 3 tokens < 9
    with pytest.raises(ValueError, match="vocab_size=10"):
        data.load_splits([str(short)], tok, block_size=2, vocab_size=5)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="0 tokens"):
        data.load_splits([str(empty)], tok, block_size=2)
    with pytest.raises(ValueError, match="vocab_size"):
        zoo.train("shakespeare-char", [str(short)], tmp_path / "o", tokenizer="char", overrides={"vocab_size": 4},
                  block_size=2)


def test_hf_dataset_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'zoo-lm\[datasets\]'"):
        data.read_texts(["hf:wikitext:wikitext-2-raw-v1"])


def test_hf_dataset_splits_train_a_model(tmp_path, monkeypatch):
    """A local dataset folder read through `datasets` (a hub name takes the same path, online)."""
    datasets = pytest.importorskip("datasets", reason="the `datasets` package (pip install 'zoo-lm[datasets]') is not "
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
    val_loss = zoo.train("shakespeare-char", [spec], tmp_path / "out", val=[spec + "@validation"], tokenizer="char",
                         overrides=TINY_MODEL, max_iters=3, **TINY)
    assert math.isfinite(val_loss)


# ------------------------------------------------------------------------------------------ loop parts

def test_noam_and_cosine_schedules():
    s = zt.TrainConfig.for_preset("scratchformer")
    d = 512
    assert zt.learning_rate(s, 1, None, d) == pytest.approx(d ** -0.5 * 4000 ** -1.5)
    assert zt.learning_rate(s, 4000, None, d) == pytest.approx(d ** -0.5 * 4000 ** -0.5)  # the peak
    assert zt.learning_rate(s, 16000, None, d) == pytest.approx(d ** -0.5 * 16000 ** -0.5)
    c = zt.TrainConfig.for_preset("shakespeare-char", lr=1, min_lr=0.1, warmup=10)
    assert zt.learning_rate(c, 5, 110, 1) == pytest.approx(0.5)
    assert zt.learning_rate(c, 10, 110, 1) == pytest.approx(1.0)
    assert zt.learning_rate(c, 60, 110, 1) == pytest.approx(0.55)
    assert zt.learning_rate(c, 110, 110, 1) == pytest.approx(0.1)


def test_the_tokenizer_rule(tmp_path, text_file):
    """choose_tokenizer: a resumed run's own, then the init source's own unless the caller names one, then the
    named one (char and bpe made from the data), then the preset's published weights' own; else an error."""
    saved, own = CharTokenizer("xyz"), CharTokenizer("uvw")
    saved.save(tmp_path / "step")
    choose = zt.choose_tokenizer
    assert choose("char", named=True, checkpoint=str(tmp_path / "step"), init_tokenizer=own).chars == saved.chars
    assert choose("char", init_tokenizer=own) is own
    from_data = CharTokenizer.from_text(open(text_file).read())
    assert choose("char", named=True, init_tokenizer=own, texts=[text_file]).chars == from_data.chars
    assert choose("char", preset="shakespeare-char", texts=[text_file]).chars == from_data.chars
    with pytest.raises(ValueError, match="preset 'scratchformer' names no tokenizer.*--tokenizer"):
        choose(None, preset="scratchformer", texts=[text_file])


def test_a_fresh_models_vocabulary_is_its_tokenizers(tmp_path):
    """shakespeare-char's 65 rows on a text of 5 characters: the model is built with the tokenizer's 5 (the other
    rows were never trained, yet sampling drew them: ids the tokenizer cannot decode); a vocab_size set stays."""
    path = tmp_path / "abc.txt"
    path.write_text("abc ab ca\n" * 300)
    small = {k: v for k, v in TINY_MODEL.items() if k != "vocab_size"}
    zoo.train("shakespeare-char", [str(path)], tmp_path / "run", overrides=small, max_iters=2, **TINY,
              tokenizer="char")
    model, tok = zoo.load_source(str(tmp_path / "run" / "step-0000002"))
    assert model.config.vocab_size == tok.vocab_size == 5
    for seed in range(4):
        zoo.complete(model, tok, "ab", max_new_tokens=40, temperature=1.0, seed=seed)
    zoo.train("shakespeare-char", [str(path)], tmp_path / "set", overrides=TINY_MODEL, max_iters=1, **TINY,
              tokenizer="char")
    assert zoo.from_pretrained(str(tmp_path / "set" / "step-0000001")).config.vocab_size == 12


def test_an_init_saved_without_a_tokenizer_trains_with_the_named_one(tmp_path, text_file):
    """init's weights alone (saved without a tokenizer) and tokenizer="char": it trained nothing before, failing
    on the missing tokenizer with advice to name one."""
    zoo.save_pretrained(zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=12)),
                        tmp_path / "bare")
    zoo.train(None, [text_file], tmp_path / "run", init=str(tmp_path / "bare"), max_iters=1, **TINY, tokenizer="char")
    assert zoo.tokenizer(str(tmp_path / "run" / "step-0000001")).vocab_size <= 12


def test_a_preset_that_names_no_tokenizer_uses_its_weights_own(smollm2_gguf):
    tokenizer = zt.choose_tokenizer(None, preset="smollm2-135m-instruct", texts=["never read"])
    assert tokenizer.vocab_size == 49152 and tokenizer.decode(tokenizer.encode("Hello, world")) == "Hello, world"


def test_settings_fill_in_what_the_caller_leaves_open():
    s = zt.settings("shakespeare-char", None, dict(lr=1e-5))
    assert (s.min_lr, s.max_iters, s.device) == (1e-5, 5000, "cpu")  # the preset's min_lr capped at the lr
    assert zt.settings(None, None, dict(time_budget=60.0)).max_iters is None  # the budget sets the horizon
    resumed = dict(settings=vars(zt.TrainConfig(lr=0.5, warmup=3)) | {"retired_field": 1})
    assert (zt.settings(None, None, dict(warmup=4), resumed).lr, zt.settings(None, None, {}, resumed).warmup) == (0.5, 3)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        zt.settings(None, dict(lr=1.0), {})


def test_scratchformer_preset_carries_its_reference_recipe():
    s = zt.TrainConfig.for_preset("scratchformer")
    assert (s.schedule, s.warmup, s.label_smoothing, s.batch_size, s.block_size, s.checkpoint_interval,
            s.tokenizer) == ("noam", 4000, 0.1, 10, 256, 10000, "gpt2")
    assert zt.TrainConfig.for_preset("scratchformer", warmup=8).warmup == 8  # the caller wins


def test_every_preset_trains_with_a_partial_train_config():
    for name, preset in zoo.registry.PRESETS.items():
        assert set(preset.train) <= {f.name for f in dataclasses.fields(zt.TrainConfig)}, name
        zt.TrainConfig(**preset.train)  # valid values


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 0, "batch_size"), ("lr", float("nan"), "lr"), ("lr", -1.0, "lr"), ("beta2", 1.0, "beta2"),
    ("schedule", "linear", "schedule"), ("warmup", -1, "warmup"), ("max_iters", 0, "max_iters"),
    ("label_smoothing", 1.0, "label_smoothing"), ("time_budget", 0.0, "time_budget"), ("device", "gpu9", "device"),
])
def test_impossible_settings_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        zt.TrainConfig(**{field: value})
    with pytest.raises(TypeError, match="batch_size"):
        zt.TrainConfig(batch_size="12")
    with pytest.raises(TypeError, match="unknown training setting"):
        zt.TrainConfig.of(zt.TrainConfig(), bacth_size=3)


def test_scratchformer_trains_with_its_recipe(tmp_path, text_file, gpt2_bpe):
    """GPT-2's BPE, the Noam schedule and label smoothing, on a tiny scratchformer."""
    zoo.train("scratchformer", [text_file], tmp_path / "o", overrides=dict(n_layer=1, n_embd=32, n_head=2, ffn_dim=64),
              block_size=32, batch_size=2, max_iters=3, log_interval=1, device="cpu", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([32 ** -0.5 * t * 4000 ** -1.5 for t in (1, 2, 3)])
    assert zoo.tokenizer(str(tmp_path / "o" / "step-0000003")).vocab_size == 50257


@pytest.mark.parametrize("name,mode", [(n, m) for m in ("fp32", "bf16", "lora-int8") for n in
                                       ("bigram", "scratchformer", "gpt2", "llama-gqa", "llama-qwen2-window",
                                        "llama-olmo2", "mqa", "gemma2")
                                       if (n, m) != ("bigram", "lora-int8")])  # the bigram has no Linear to adapt
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_head_loss_equals_the_logits_loss(name, mode, smoothing):
    """zoo/loss.py computes the loss and its gradients a chunk of positions at a time, in the forward pass;
    the loss and every gradient must equal F.cross_entropy over the whole logits (label smoothing and
    ignored targets included), for full fine-tuning (a tied head too) and LoRA over an int8 base; Gemma 2's logits
    soft-capped before the loss."""
    x = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(2))
    y[0, :9] = y[2, 7] = data.IGNORE  # the first chunk of 7 positions has no target at all
    results = []
    for fused in (False, True):
        model = tiny_model(name, std=0.3).train()
        if mode == "lora-int8":
            model = zoo.add_lora(zoo.adapters.quantize_int8(model), r=4)
            for n, p in model.named_parameters():  # B starts at zero: give the adapters something to say
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            if fused:
                loss = HeadLoss(model, chunk=7)(model, x, y, label_smoothing=smoothing)  # 60 positions: 9 chunks
            else:
                loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten(),
                                                         ignore_index=data.IGNORE, label_smoothing=smoothing)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
        assert model(x).shape == (3, 20, 37)  # outside a loss call the head gives logits again
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):  # evaluation
            summed = HeadLoss(model, chunk=7)(model, x, y, reduction="sum", label_smoothing=smoothing) if fused \
                else torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten(),
                                                       ignore_index=data.IGNORE, reduction="sum",
                                                       label_smoothing=smoothing)
        results[-1] += (summed.item(),)
    (plain, plain_grads, plain_sum), (fused, fused_grads, fused_sum) = results
    assert fused == pytest.approx(plain, rel=1e-6 if mode == "fp32" else 1e-3)
    assert fused_sum == pytest.approx(plain_sum, rel=1e-6 if mode == "fp32" else 1e-3)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for n, g in plain_grads.items():
        assert g.abs().sum() > 0, n
        tol = dict(rtol=1e-5, atol=1e-6) if mode == "fp32" else dict(rtol=0.05, atol=0.02 * g.abs().max().item())
        torch.testing.assert_close(fused_grads[n], g, msg=n, **tol)



def test_a_small_vocabularys_batch_takes_plain_cross_entropy(monkeypatch):
    """A batch whose float32 logits are small and one chunk (a character model's) takes F.cross_entropy through
    autograd, faster there; more logits, or more positions than a chunk, take the chunks."""
    import zoo.loss
    x = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(2))
    y[0, :5] = data.IGNORE
    model = tiny_model("gpt2", std=0.3)
    chunked, apply = [], zoo.loss._HeadCrossEntropy.apply
    monkeypatch.setattr(zoo.loss._HeadCrossEntropy, "apply", lambda *a: chunked.append(1) or apply(*a))
    plain = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=data.IGNORE,
                                              label_smoothing=0.1)
    assert HeadLoss(model)(model, x, y, label_smoothing=0.1).item() == pytest.approx(plain.item(), rel=1e-6)
    assert not chunked
    HeadLoss(model, chunk=7)(model, x, y)
    assert len(chunked) == 1
    monkeypatch.setattr(zoo.loss, "SMALL_LOGITS", 60 * 37 - 1)
    assert HeadLoss(model)(model, x, y, label_smoothing=0.1).item() == pytest.approx(plain.item(), rel=1e-6)
    assert len(chunked) == 2

def test_chunked_head_loss_takes_no_gradient_under_no_grad_and_follows_a_deep_copy(monkeypatch):
    """Evaluation (torch.no_grad) with a trainable head computes no gradient at all; a deep copy of the model
    computes its loss with its own head's weights; two HeadLoss over one model agree; the graph's gradients
    are used once (a second backward pass is an error, not silently doubled gradients)."""
    x = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(2))

    def plain(m):
        return torch.nn.functional.cross_entropy(m(x).float().flatten(0, 1), y.flatten(), reduction="sum")

    model = tiny_model("gpt2", std=0.3)  # its head is tied to the trainable embedding
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    loss_of = HeadLoss(model, chunk=7)
    with torch.no_grad():
        expected = plain(model)
        with monkeypatch.context() as m:
            m.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("a gradient under torch.no_grad"))
            summed = loss_of(model, x, y, reduction="sum")
    assert summed.item() == pytest.approx(expected.item(), rel=1e-6)
    assert HeadLoss(model, chunk=5)(model, x, y, reduction="sum").item() == pytest.approx(expected.item(), rel=1e-6)

    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
        assert HeadLoss(twin)(twin, x, y, reduction="sum").item() == pytest.approx(plain(twin).item(), rel=1e-6)
        assert plain(twin).item() != pytest.approx(expected.item(), rel=1e-3)

    loss = loss_of(model, x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward pass runs once"):
        loss.backward()
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == attributes  # the model was not patched


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gemma2", "bigram"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "lora"])
def test_chunked_target_logps_equal_the_logits(name, mode):
    """zoo/loss.py's per-target log-probabilities (DPO's) equal log_softmax of the whole logits, and so do the
    gradients of a sum that weighs each target differently: with a trainable head (its gradients computed in the
    backward pass, in the forward's autocast) and with a frozen one under LoRA (computed in the forward pass)."""
    x = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(2))
    valid = torch.rand(3, 20, generator=torch.Generator().manual_seed(3)) < 0.6  # [3, 20]: the targets scored
    weights = torch.randn(int(valid.sum()), generator=torch.Generator().manual_seed(4))  # [K]
    results = []
    for chunked in (False, True):
        model = tiny_model(name, std=0.3).train()
        if mode == "lora" and name != "bigram":
            model = zoo.add_lora(model, r=4)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            if chunked:
                logps = target_logps(model, hidden_state(model, model, x)[valid], y[valid], chunk=7)  # [K]
            else:
                logps = model(x).float().log_softmax(-1).gather(-1, y[..., None])[..., 0][valid]
        (logps * weights).sum().backward()
        results.append((logps.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, plain, **(dict(rtol=1e-5, atol=1e-5) if mode != "bf16" else {}))
    assert our_grads.keys() == plain_grads.keys() and plain_grads
    assert mode != "lora" or name == "bigram" or not model.lm_head.weight.requires_grad
    for n, g in plain_grads.items():
        assert g.abs().sum() > 0, n
        tol = dict(rtol=0.05, atol=0.02) if mode == "bf16" else dict(rtol=1e-5, atol=2e-6)  # (of the largest)
        torch.testing.assert_close(our_grads[n], g, msg=n, rtol=tol["rtol"], atol=tol["atol"] * g.abs().max().item())

def test_weight_decay_only_on_matrices():
    model = zoo.load("shakespeare-char", n_layer=1, bias=True)
    s = zt.TrainConfig.for_preset("shakespeare-char")
    decay, no_decay = zt.make_optimizer(model, s, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))



@pytest.mark.parametrize("fused", [True, None], ids=["fused", "foreach"])
def test_the_optimizer_steps_as_torch_adamw_and_its_state_interchanges(fused):
    """zoo's AdamW (torch's, without the decorators that import torch._dynamo) takes the same steps as
    torch.optim.AdamW, bit for bit, with grad enabled around step() or not; a state dict saved from either
    continues identically in the other."""
    torch.manual_seed(0)
    a = zoo.load("shakespeare-char", n_layer=1, bias=True)
    b = copy.deepcopy(a)

    def groups(model):
        ps = list(model.parameters())
        return [dict(params=[p for p in ps if p.dim() >= 2], weight_decay=0.1),
                dict(params=[p for p in ps if p.dim() < 2], weight_decay=0.0)]

    ours = zt.AdamW(groups(a), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    theirs = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    x = torch.randint(0, 65, (4, 16))

    def steps(model, opt, n):
        for _ in range(n):
            model(x).float().logsumexp(-1).mean().backward()
            opt.step()  # grad enabled here: the step must not record itself
            opt.zero_grad(set_to_none=True)

    steps(a, ours, 3), steps(b, theirs, 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.grad is None and p.grad_fn is None for p in a.parameters())
    ours.load_state_dict(theirs.state_dict()), theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    steps(a, ours, 2), steps(b, theirs, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_training_start_up_does_not_import_dynamo(tmp_path, text_file):
    """torch.optim's methods import torch._dynamo on first call (1.4 s); a training run never needs it."""
    code = ("import sys, zoo; zoo.train('bigram', [sys.argv[1]], sys.argv[2], tokenizer='char', max_iters=3, "
            "eval_iters=1, progress=False); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(text_file), str(tmp_path / "out")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[-1] == "False"

# ------------------------------------------------------------------------------------------ proofs

@pytest.mark.slow
def test_bigram_reaches_the_conditional_entropy(tmp_path, text_file):
    text = open(text_file).read()
    pairs, firsts = Counter(zip(text, text[1:])), Counter(text[:-1])
    n = len(text) - 1
    entropy = -sum(c / n * math.log(c / firsts[a]) for (a, _), c in pairs.items())  # nats per token
    zoo.train("bigram", [text_file], tmp_path / "o", val=[text_file], tokenizer="char", overrides={"vocab_size": 12},
              batch_size=32, block_size=64, lr=0.1, min_lr=0.001, weight_decay=0.0, max_iters=300, warmup=10,
              eval_interval=1000, device="cpu", progress=False)
    model = zoo.from_pretrained(str(tmp_path / "o" / "step-0000300"))
    ids = torch.tensor(CharTokenizer.from_text(text).encode(text))
    loss = torch.nn.functional.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()
    assert loss == pytest.approx(entropy, rel=0.01)


def test_resume_continues_exactly(tmp_path, text_file, monkeypatch):
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
    assert val_losses(tmp_path / "b") != val_losses(tmp_path / "a")  # the crash cut it short
    zoo.train("shakespeare-char", [text_file], tmp_path / "b", resume=True, progress=False)  # its own settings
    assert len(val_losses(tmp_path / "a")) == 4 and val_losses(tmp_path / "b") == val_losses(tmp_path / "a")
    a = load_file(tmp_path / "a" / "step-0000012" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step-0000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):  # the log without its timings
        return [{k: v for k, v in json.loads(line).items() if k != "tok_per_s"}
                for line in open(tmp_path / run / "log.jsonl")]
    assert rows("b") == rows("a")


@pytest.mark.slow
def test_resume_with_more_iterations_continues_to_them(tmp_path, text_file, caplog):
    """30 steps, then resumed to 60, equals 60 straight under a step-only schedule (noam)."""
    common = dict(schedule="noam", lr=0.5, warmup=10, eval_interval=10, checkpoint_interval=30, log_interval=5)
    straight = tiny(tmp_path / "straight", text_file, max_iters=60, **common)
    tiny(tmp_path / "split", text_file, max_iters=30, **common)
    resumed = zoo.train("shakespeare-char", [text_file], tmp_path / "split", resume=True, max_iters=60)
    assert resumed == straight and val_losses(tmp_path / "split") == val_losses(tmp_path / "straight")
    assert sorted(os.listdir(tmp_path / "split")) == sorted(os.listdir(tmp_path / "straight"))
    # nothing left to do: said, not silently skipped
    again = zoo.train("shakespeare-char", [text_file], tmp_path / "split", resume=True)
    assert again == pytest.approx(straight)
    # with cosine, a longer horizon changes the schedule: it says so
    tiny(tmp_path / "cos", text_file, max_iters=10, checkpoint_interval=10)
    zoo.train("shakespeare-char", [text_file], tmp_path / "cos", resume=True, max_iters=20)
    assert max(int(d[5:]) for d in os.listdir(tmp_path / "cos") if d.startswith("step-")) == 20


@pytest.mark.slow
def test_resume_notes_go_to_the_zoo_logger(tmp_path, text_file, capfd):
    tiny(tmp_path / "o", text_file, max_iters=4)
    capfd.readouterr()
    zoo.train("shakespeare-char", [text_file], tmp_path / "o", resume=True)
    assert "nothing to train" in capfd.readouterr().err
    zoo.train("shakespeare-char", [text_file], tmp_path / "o", resume=True, max_iters=6)
    assert "horizon changed from 4 to 6" in capfd.readouterr().err
    logging.getLogger("zoo").setLevel(logging.WARNING + 1)  # a Python user silences the notes
    try:
        zoo.train("shakespeare-char", [text_file], tmp_path / "o", resume=True)
        assert "nothing to train" not in capfd.readouterr().err
    finally:
        logging.getLogger("zoo").setLevel(logging.INFO)


def test_checkpoint_contents_load_with_weights_only(tmp_path, text_file):
    tiny(tmp_path / "o", text_file, max_iters=2)
    ckpt = tmp_path / "o" / "step-0000002"
    state = torch.load(ckpt / runs.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and state["arch"] == "gpt2" and state["config"]["n_embd"] == 32
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"} and "state" in state["optimizer"]
    model = zoo.from_pretrained(str(ckpt))
    assert model.config.n_embd == 32
    assert zoo.tokenizer(str(ckpt)).vocab_size == 12
    assert not [d for d in os.listdir(tmp_path / "o") if d.startswith(".tmp")]
    assert (tmp_path / "o" / "log.jsonl").exists() and (tmp_path / "o" / "loss.png").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch):
    real = HeadLoss.__call__
    calls = []

    def poisoned(*a, **k):  # the training loss turns NaN from the 5th step on
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 4 and torch.is_grad_enabled() else loss
    monkeypatch.setattr(HeadLoss, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match="step-0000004"):
        tiny(tmp_path / "o", text_file, max_iters=10, checkpoint_interval=2, log_interval=1)
    assert sorted(os.listdir(tmp_path / "o")) == ["log.jsonl", "loss.png", "step-0000002", "step-0000004"]
    model = zoo.from_pretrained(str(tmp_path / "o" / "step-0000004"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_starts_from_pretrained_weights(tmp_path, text_file):
    before = tiny(tmp_path / "a", text_file, max_iters=20, lr=3e-3)
    # one step at a vanishing learning rate: the model (and its validation loss) is the one loaded
    val = zoo.train(None, [text_file], tmp_path / "b", init=tmp_path / "a" / "step-0000020", max_iters=1, lr=1e-12,
                    warmup=0, **TINY)
    assert val == pytest.approx(before, abs=1e-4) and before < math.log(12)


@pytest.mark.slow
@pytest.mark.parametrize("preset, fields", [("qwen3-0.6b", dict(head_dim=8)),
                                            ("olmo-2-1b", dict(sliding_window=8, full_attention_layers=1))])
def test_llama_relatives_train_from_scratch_and_init(tmp_path, text_file, preset, fields):
    """A relative's preset, shrunk, learns the characters and --init resumes from its weights."""
    shrunk = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_dim=48, vocab_size=12, **fields)
    before = tiny(tmp_path / "a", text_file, preset=preset, overrides=shrunk, max_iters=20, lr=3e-3)
    val = zoo.train(None, [text_file], tmp_path / "b", init=tmp_path / "a" / "step-0000020", max_iters=1, lr=1e-12,
                    warmup=0, **TINY)
    assert val == pytest.approx(before, abs=1e-4) and before < math.log(12)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_label_smoothing_grad_accum(tmp_path, text_file, device):
    val = tiny(tmp_path / "o", text_file, device=device, bf16=True, label_smoothing=0.1, grad_accum=2, max_iters=30,
               lr=3e-3)
    assert val < math.log(12) - 0.1  # learned something


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, text_file, device):
    """--compile trains the same model: fp32 losses equal the eager run's to float rounding."""
    args = dict(device=device.type, max_iters=20, eval_interval=10, lr=3e-3)
    eager = tiny(tmp_path / "eager", text_file, **args)
    compiled = tiny(tmp_path / "compiled", text_file, compile=True, **args)
    assert compiled == pytest.approx(eager, rel=1e-4) and eager < math.log(12) - 0.1
    assert zoo.from_pretrained(str(tmp_path / "compiled" / "step-0000020")).config.n_layer == 1  # clean names


# ------------------------------------------------------------------------------------------ processes

def zoo_cmd(*args, launcher=(sys.executable, "-m", "zoo"), timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_command_line_train_then_eval(tmp_path, text_file, zoo_main):
    out = tmp_path / "o"
    r = zoo_cmd("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY_ARGV,
                "--max-iters", "6", "--checkpoint-interval", "3", "--out", str(out))
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("val_loss ") and float(last.split()[1]) < 3.0
    code, stdout, err = zoo_main("eval", out, "--data", text_file, "--split", "val", "--window", "32", "--stride", "16")
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["step-0000003", "step-0000006"]
    assert all(line.split()[1:4:2] == ["loss", "ppl"] for line in lines)
    loss, ppl = float(lines[-1].split()[2]), float(lines[-1].split()[4])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)


@pytest.mark.slow
def test_time_budget_bounds_the_whole_command(tmp_path, text_file):
    """The budget plans the horizon from the measured step time and stops by itself (how close it lands to
    the budget is a timing, measured by bench/train_shakespeare.py, not asserted here)."""
    r = zoo_cmd("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY_ARGV,
                "--time-budget", "6", "--max-iters", "10000000", "--eval-interval", "50", "--out", str(tmp_path / "o"))
    assert r.stdout.strip().splitlines()[-1].startswith("val_loss ")
    steps = [int(d[5:]) for d in os.listdir(tmp_path / "o") if d.startswith("step-")]
    rows = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    # trained, then stopped cleanly by its own plan (how many steps fit depends on the machine and on how long the
    # interpreter took to start, which the budget counts: not asserted), long before the cap of 10 million steps
    # (hours of this tiny model's steps), which only the budget could have stopped it short of
    assert 1 <= max(steps) == rows[-1]["step"] < 10 ** 7 and "val_loss" in rows[-1]


@pytest.mark.slow
def test_two_processes_match_one_over_the_same_global_batch(tmp_path, text_file, zoo_main):
    common = ["train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY_ARGV,
              "--max-iters", "3", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "0"]
    assert zoo_main(*common, "--out", tmp_path / "one")[0] == 0
    zoo_cmd(*common, "--out", str(tmp_path / "two"),
            launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoo"))
    one = load_file(tmp_path / "one" / "step-0000003" / "model.safetensors")
    two = load_file(tmp_path / "two" / "step-0000003" / "model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ safety

def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_earlier_run_is_never_overwritten(tmp_path, text_file):
    out = tmp_path / "o"
    tiny(out, text_file, max_iters=2)
    before = snapshot(out)
    with pytest.raises(ValueError, match="holds an earlier run.*--resume.*--overwrite"):
        tiny(out, text_file, max_iters=2, seed=3)
    assert snapshot(out) == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        tiny(tmp_path / "file", text_file, max_iters=2)
    assert (tmp_path / "file").read_text() == "mine"
    tiny(out, text_file, max_iters=2, seed=3, overwrite=True)  # starts again; the old run moved aside, whole
    assert snapshot(tmp_path / "o.old-1") == before and snapshot(out) != before


def test_overwrite_moves_the_earlier_run_only_once_training_starts(tmp_path, text_file, zoo_main):
    """Bad data (or settings, or weights) with --overwrite is refused before the earlier run is moved aside."""
    out = tmp_path / "o"
    tiny(out, text_file, max_iters=2)
    before = snapshot(out)
    code, _, err = zoo_main("train", "shakespeare-char", "--data", tmp_path / "nope.txt", "--tokenizer", "char",
                            *TINY_ARGV, "--out", out, "--overwrite")
    assert code == 2 and "nope.txt" in err and "moved" not in err
    assert snapshot(out) == before and not (tmp_path / "o.old-1").exists()


def test_a_folder_of_other_files_is_refused(tmp_path, text_file, zoo_main):
    """A folder that is not a run (the user's own loss.png) is never written into; a path under a file is named."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "loss.png").write_text("my plot")
    code, _, err = zoo_main("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY_ARGV,
                            "--max-iters", "1", "--out", mine)
    assert code == 2 and "not a zoo run (loss.png)" in err and "another folder" in err
    assert os.listdir(mine) == ["loss.png"] and (mine / "loss.png").read_text() == "my plot"
    (tmp_path / "afile").write_text("mine")
    code, _, err = zoo_main("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY_ARGV,
                            "--out", tmp_path / "afile" / "sub")
    assert code == 2 and "is inside" in err and "afile" in err and "Errno" not in err


def test_resume_refuses_what_differs_from_the_run(tmp_path, text_file, zoo_main):
    """--resume continues the run as it was: a preset, --init, data, --set, --tokenizer or LoRA that differs from
    the run's is refused (exit 2, each named, nothing written), so is --overwrite with it; the run's own flags and
    training settings (--lr, a larger --max-iters) are taken."""
    out = tmp_path / "o"
    tiny(out, text_file, max_iters=2)
    other = tmp_path / "other.txt"
    other.write_text(markov_text(5000, seed=1))
    before = snapshot(out)

    def resume(*argv, data=text_file):
        code, _, err = zoo_main("train", *argv, "--data", data, "--out", out, "--resume", "--no-progress")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("zoo train: error: "), err
        assert snapshot(out) == before
        return lines[0]
    err = resume("bigram", "--set", "n_layer=2")
    assert "preset 'bigram' (the run's: 'shakespeare-char')" in err
    assert "(--set) n_layer=2 (the run's: 1)" in err and "--init " + str(out / "step-0000002") in err
    err = resume("--tokenizer", "gpt2", "--seed", "7")
    assert "tokenizer (--tokenizer) 'gpt2' (the run's: 'char')" in err and "seed (--seed) 7" in err
    assert "--lora-r" in resume("--lora", "4")
    assert "give one of them" in resume("--overwrite")
    with pytest.raises(ValueError, match="tokenizer .* 'gpt2'"):  # the library's config= too
        zoo.train(None, [text_file], out, resume=True, config=zoo.TrainConfig(tokenizer="gpt2"))
    assert snapshot(out) == before
    code, _, err = zoo_main("train", "shakespeare-char", "--data", text_file, "--tokenizer", "char", *TINY_ARGV,
                            "--out", out, "--resume", "--max-iters", "3", "--lr", "1e-3")
    assert code == 0, err
    assert torch.load(out / "step-0000003" / runs.STATE_FILE, weights_only=True)["settings"]["lr"] == 1e-3


def test_resume_from_moved_data_warns_and_trains_on_it(tmp_path, text_file, zoo_main, caplog):
    """A run resumed from another folder or machine finds its data at another path: named in a warning, not
    refused (--data is required, and the old path may be gone); the checkpoints record the new path."""
    out = tmp_path / "o"
    tiny(out, text_file, max_iters=2)
    moved = tmp_path / "elsewhere" / "text.txt"
    moved.parent.mkdir()
    shutil.copy(text_file, moved)
    code, _, err = zoo_main("train", "--data", moved, "--out", out, "--resume", "--max-iters", "3", "--no-progress")
    assert code == 0, err
    assert f"data (--data) {[str(moved)]} where the run had {[os.path.realpath(text_file)]}" in caplog.text
    state = torch.load(out / "step-0000003" / runs.STATE_FILE, weights_only=True)
    assert state["inputs"]["data"] == [str(moved)]


def test_overwrite_refuses_inputs_inside_the_folder_it_moves(tmp_path, text_file, zoo_main):
    """--overwrite moves OUT aside: an --init or data file inside it would move under the new run (a LoRA run
    records its base by path), so it is refused, and OUT stays."""
    out = tmp_path / "o"
    tiny(out, text_file, max_iters=1)
    inside = out / "data.txt"
    shutil.copy(text_file, inside)
    before = snapshot(out)
    for argv in (["--init", out / "step-0000001", "--data", text_file], ["shakespeare-char", "--data", inside]):
        code, _, err = zoo_main("train", *argv, "--tokenizer", "char", *TINY_ARGV, "--out", out, "--overwrite",
                                "--no-progress")
        assert code == 2 and "is inside out" in err and "copy it out first" in err, err
    assert snapshot(out) == before


def test_hidden_files_do_not_make_a_folder_someone_elses(tmp_path, text_file):
    """A folder holding only hidden files (.DS_Store, .ipynb_checkpoints) takes a run; one holding the user's
    files is refused unless --overwrite, which moves them aside, never deletes them."""
    hidden = tmp_path / "h"
    (hidden / ".ipynb_checkpoints").mkdir(parents=True)
    tiny(hidden, text_file, max_iters=1)
    theirs = tmp_path / "t"
    theirs.mkdir()
    (theirs / "loss.png").write_text("my plot")
    with pytest.raises(ValueError, match="not a zoo run.*--overwrite"):
        tiny(theirs, text_file, max_iters=1)
    tiny(theirs, text_file, max_iters=1, overwrite=True)
    assert (tmp_path / "t.old-1" / "loss.png").read_text() == "my plot"


def test_init_refuses_a_preset_of_another_architecture(tmp_path, text_file, zoo_main):
    """With --init the preset only gives training settings: one that would build another architecture is a
    mistake, named."""
    tiny(tmp_path / "a", text_file, max_iters=1)
    code, _, err = zoo_main("train", "bigram", "--init", tmp_path / "a" / "step-0000001", "--data", text_file,
                            *TINY_ARGV, "--out", tmp_path / "b")
    assert code == 2 and "preset 'bigram' is a bigram model" in err and "holds a gpt2 model" in err, err
    assert not (tmp_path / "b").exists()


def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it(tmp_path, text_file, capfd):
    common = dict(max_iters=6, checkpoint_interval=2, eval_interval=2, seed=5)
    tiny(tmp_path / "a", text_file, **common)
    tiny(tmp_path / "b", text_file, **common)
    state = tmp_path / "b" / "step-0000006" / runs.STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])  # truncated, as by a full disk
    weights = tmp_path / "b" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    damaged = {p: p.read_bytes() for p in (state, weights)}
    capfd.readouterr()
    val = zoo.train("shakespeare-char", [text_file], tmp_path / "b", resume=True, max_iters=6)
    err = capfd.readouterr().err
    assert str(state) in err and "step-0000004" in err and "resuming from" in err and "step-0000002" in err
    assert val == pytest.approx(val_losses(tmp_path / "a")[-1], abs=1e-4)  # (the log keeps 4 decimals)
    assert val_losses(tmp_path / "b") == val_losses(tmp_path / "a")
    kept = {p: (p.parent.parent / (p.parent.name + ".damaged-1") / p.name).read_bytes() for p in damaged}
    assert kept == damaged  # never deleted: renamed when the resumed run wrote that step again


def test_set_values_are_parsed_by_the_config_fields_type(tmp_path, text_file, capfd):
    from zoo.cli import main
    code = main(["train", "shakespeare-char", "--data", text_file, "--out", str(tmp_path / "o"), "--set",
                 "n_layer=abc", "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("zoo train: error:") and "n_layer" in err[0]
    assert not (tmp_path / "o").exists()


def test_bf16_training_falls_back_to_float32_on_a_cpu_without_bf16_arithmetic(monkeypatch, caplog):
    """Where the CPU has no bf16 arithmetic (no AVX512-BF16 or AMX) torch emulates it several times slower than
    float32, so a run asking for bf16 autocast trains in float32 there: quietly where the preset chose it
    (shakespeare-char's), saying so where the caller did; a CPU with it, or CUDA, keeps bf16."""
    for native, device, kept in ((False, "cpu", False), (True, "cpu", True), (False, "cuda", True)):
        monkeypatch.setattr(zt, "native_bf16", lambda: native)
        for fields in ({}, {"bf16": True}):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="zoo"):
                s = zt.settings("shakespeare-char", None, {"device": device, **fields})
            assert s.bf16 is kept and ("no bfloat16 arithmetic" in caplog.text) is (not kept and bool(fields))
        assert zt.settings(None, None, {"device": device, "bf16": False}).bf16 is False
