"""The catalogue of wrong inputs: through the Python API, the model files and the command line, each gets the
error type it should (ValueError, TypeError, FileNotFoundError; the CLI: exit status 2 and one
`zoo COMMAND: error: ...` line, no traceback), a message naming the culprit, and changes no file. Also: the
run a SIGKILL interrupts resumes to the same result, and output folders are never silently overwritten and a damaged newest checkpoint falls back to an intact one."""
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny

import zoo
import zoo.cli
from zoo import data, evaluation
from zoo.tokenizers import CharTokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NAN = float("nan")


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ the workspace

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A folder of things users point zoo at: a saved model, text files (one not UTF-8), a damaged
    safetensors and GGUF file, a folder that holds no model, a regular file."""
    root = tmp_path_factory.mktemp("ws")
    torch.manual_seed(0)
    zoo.save_pretrained(tiny("gpt2"), root / "model", tokenizer=CharTokenizer("abcdefghij \n"))
    (root / "text.txt").write_text("abcdefghij \n" * 400)
    (root / "latin1.txt").write_bytes("naïve café\n".encode("latin-1"))
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("keep me")
    (root / "afile").write_text("not a model")
    shutil.copytree(root / "model", root / "torn")
    st = root / "torn" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:st.stat().st_size // 2])
    shutil.copytree(root / "model", root / "badjson")
    (root / "badjson" / "config.json").write_text('{"model_type": "gpt2",')
    (root / "empty.gguf").write_bytes(b"")
    (root / "torn.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little"))
    (root / "out").mkdir()
    (root / "adapter.gguf").write_bytes(b"GGUF")  # llama.cpp's kind of LoRA adapter
    for step in ("step-0000002", "step-0000010"):  # a training run's folder
        shutil.copytree(root / "model", root / "run" / step)
    return root


def snapshot(root):
    """Every file and folder under root, with each file's size and hash."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        out[dirpath] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------ API and model files

def model():
    return tiny("gpt2")


def cached(arch="gpt2", B=1, S=8):
    m = tiny(arch)
    m.setup_cache(B, S)
    return m


def ids(*shape, high=37):
    return torch.randint(0, high, shape)


# (id, call(ws), error type, text the message must contain): every entry changes no file under ws
API = [
    # presets, configs, models
    ("load-unknown-preset", lambda ws: zoo.load("gpt3"), ValueError, "'gpt3'"),
    ("load-unknown-field", lambda ws: zoo.load("gpt2", n_foo=1), ValueError, "n_foo"),
    ("load-field-wrong-type", lambda ws: zoo.load("shakespeare-char", n_layer="abc"), TypeError, "n_layer"),
    ("load-zero-heads", lambda ws: zoo.load("shakespeare-char", n_head=0), ValueError, "n_head"),
    ("load-negative-vocab", lambda ws: zoo.load("shakespeare-char", vocab_size=-1), ValueError, "vocab_size"),
    ("load-dropout-above-1", lambda ws: zoo.load("shakespeare-char", dropout=1.5), ValueError, "dropout"),
    ("load-dropout-nan", lambda ws: zoo.load("shakespeare-char", dropout=NAN), ValueError, "dropout"),
    ("load-float-size", lambda ws: zoo.load("shakespeare-char", n_embd=12.5), TypeError, "n_embd"),
    ("load-dtype-unknown", lambda ws: zoo.load("bigram", dtype="float99"), ValueError, "float99"),
    ("load-device-unknown", lambda ws: zoo.load("bigram", device="gpu9"), ValueError, "gpu9"),
    ("build-unknown-arch", lambda ws: zoo.build("gpt5", {}), ValueError, "gpt5"),
    ("build-config-not-a-dict", lambda ws: zoo.build("gpt2", 5), TypeError, "config"),
    ("arch-of-non-model", lambda ws: zoo.arch_of(5), TypeError, "zoo model"),
    # loading
    ("from-pretrained-missing", lambda ws: zoo.from_pretrained(ws / "nope"), FileNotFoundError, "nope"),
    ("from-pretrained-regular-file", lambda ws: zoo.from_pretrained(ws / "afile"), ValueError, "afile"),
    ("from-pretrained-no-config", lambda ws: zoo.from_pretrained(ws / "notes"), FileNotFoundError, "config.json"),
    ("from-pretrained-bad-json", lambda ws: zoo.from_pretrained(ws / "badjson"), ValueError, "badjson"),
    ("from-pretrained-dtype-unknown", lambda ws: zoo.from_pretrained(ws / "model", dtype="float99"), ValueError,
     "float99"),
    ("from-pretrained-dtype-int", lambda ws: zoo.from_pretrained(ws / "model", dtype="int8"), ValueError, "int8"),
    ("from-pretrained-device-unknown", lambda ws: zoo.from_pretrained(ws / "model", device="gpu9"), ValueError,
     "gpu9"),
    ("from-pretrained-source-int", lambda ws: zoo.from_pretrained(5), TypeError, "source"),
    ("from-pretrained-source-none", lambda ws: zoo.from_pretrained(None), TypeError, "source"),
    ("from-pretrained-misshaped-override", lambda ws: zoo.from_pretrained(ws / "model", n_embd=64), ValueError,
     "model"),
    ("from-pretrained-override-type", lambda ws: zoo.from_pretrained(ws / "model", dropout="high"), TypeError,
     "dropout"),
    ("from-pretrained-torn-safetensors", lambda ws: zoo.from_pretrained(ws / "torn"), ValueError,
     "model.safetensors"),
    ("from-pretrained-empty-gguf", lambda ws: zoo.from_pretrained(ws / "empty.gguf"), ValueError, "empty.gguf"),
    ("from-pretrained-torn-gguf", lambda ws: zoo.from_pretrained(ws / "torn.gguf"), ValueError, "torn.gguf"),
    ("from-pretrained-missing-gguf", lambda ws: zoo.from_pretrained(ws / "nope.gguf"), FileNotFoundError,
     "nope.gguf"),
    ("load-source-missing", lambda ws: zoo.load_source(ws / "nope"), FileNotFoundError, "nope"),
    ("preset-without-weights", lambda ws: zoo.from_pretrained("shakespeare-char"), ValueError, "shakespeare-char"),
    # saving
    ("save-into-non-model-folder", lambda ws: zoo.save_pretrained(model(), ws / "notes"), ValueError, "notes"),
    ("save-onto-regular-file", lambda ws: zoo.save_pretrained(model(), ws / "afile"), ValueError, "afile"),
    ("save-non-model", lambda ws: zoo.save_pretrained(5, ws / "new"), TypeError, "zoo model"),
    # tokenizers
    ("tokenizer-unknown", lambda ws: zoo.tokenizer("nope"), ValueError, "'nope'"),
    ("tokenizer-source-int", lambda ws: zoo.tokenizer(5), TypeError, "tokenizer source"),
    ("tokenizer-missing-file", lambda ws: zoo.tokenizer(ws / "nope.json"), FileNotFoundError, "nope.json"),
    ("tokenizer-not-a-tokenizer-file", lambda ws: zoo.tokenizer(ws / "text.txt"), ValueError, "text.txt"),
    ("tokenizer-folder-without-one", lambda ws: zoo.tokenizer(ws / "notes"), FileNotFoundError, "notes"),
    ("char-encode-outside-alphabet", lambda ws: CharTokenizer("abc").encode("abz"), ValueError, "'z'"),
    ("char-decode-id-out-of-range", lambda ws: CharTokenizer("abc").decode([0, 7]), ValueError, "[0, 3)"),
    # generation settings
    ("generate-temperature-nan", lambda ws: zoo.generate(model(), [1], 2, temperature=NAN), ValueError,
     "temperature"),
    ("generate-temperature-str", lambda ws: zoo.generate(model(), [1], 2, temperature="hot"), TypeError,
     "temperature"),
    ("generate-temperature-negative", lambda ws: zoo.generate(model(), [1], 2, temperature=-1), ValueError,
     "temperature"),
    ("generate-top-k-zero", lambda ws: zoo.generate(model(), [1], 2, top_k=0), ValueError, "top_k"),
    ("generate-top-p-above-1", lambda ws: zoo.generate(model(), [1], 2, top_p=1.5), ValueError, "top_p"),
    ("generate-min-p-negative", lambda ws: zoo.generate(model(), [1], 2, min_p=-0.1), ValueError, "min_p"),
    ("generate-repetition-penalty-zero", lambda ws: zoo.generate(model(), [1], 2, repetition_penalty=0), ValueError,
     "repetition_penalty"),
    ("generate-beams-zero", lambda ws: zoo.generate(model(), [1], 2, num_beams=0), ValueError, "num_beams"),
    ("generate-beams-with-top-k", lambda ws: zoo.generate(model(), [1], 2, num_beams=2, top_k=5), ValueError,
     "num_beams"),
    ("generate-seed-too-big", lambda ws: zoo.generate(model(), [1], 2, seed=2 ** 64), ValueError, "seed"),
    ("generate-eos-negative", lambda ws: zoo.generate(model(), [1], 2, eos_token_id=-1), ValueError,
     "eos_token_id"),
    ("generate-eos-outside-vocabulary", lambda ws: zoo.generate(model(), [1], 2, eos_token_id=[2, 10 ** 6]),
     ValueError, "eos_token_id 1000000 is outside"),
    ("generate-unknown-setting", lambda ws: zoo.generate(model(), [1], 2, temprature=1), TypeError, "temprature"),
    ("generate-sampling-not-config", lambda ws: zoo.generate(model(), [1], 2, sampling={"top_k": 1}), TypeError,
     "SamplingConfig"),
    ("generate-max-new-negative", lambda ws: zoo.generate(model(), [1], -1), ValueError, "max_new_tokens"),
    ("generate-max-new-float", lambda ws: zoo.generate(model(), [1], 2.5), ValueError, "max_new_tokens"),
    # generation inputs
    ("generate-empty-prompt", lambda ws: zoo.generate(model(), [[1], []], 2), ValueError, "prompt 1"),
    ("generate-prompt-text", lambda ws: zoo.generate(model(), "hello", 2), TypeError, "zoo.complete"),
    ("generate-prompt-none", lambda ws: zoo.generate(model(), None, 2), TypeError, "prompts"),
    ("generate-prompt-float-ids", lambda ws: zoo.generate(model(), [1.5, 2], 2), TypeError, "token ids"),
    ("generate-prompt-id-outside-vocab", lambda ws: zoo.generate(model(), [1, 99], 2), ValueError, "[0, 37)"),
    ("generate-prompt-too-long", lambda ws: zoo.generate(model(), [1] * 65, 2), ValueError, "block_size"),
    ("generate-model-is-a-name", lambda ws: zoo.generate("gpt2", [1], 2), TypeError, "model"),
    ("complete-messages-without-template", lambda ws: zoo.complete(model(), CharTokenizer("abc"),
                                                                   [{"role": "user", "content": "a"}],
                                                                   max_new_tokens=2), ValueError, "chat template"),
    ("complete-max-new-missing", lambda ws: zoo.complete(model(), CharTokenizer("abc"), "ab", max_new_tokens=None),
     ValueError, "max_new_tokens"),
    # training settings and data
    ("trainconfig-lr-nan", lambda ws: zoo.TrainConfig(lr=NAN), ValueError, "lr"),
    ("trainconfig-batch-zero", lambda ws: zoo.TrainConfig(batch_size=0), ValueError, "batch_size"),
    ("trainconfig-schedule-unknown", lambda ws: zoo.TrainConfig(schedule="linear"), ValueError, "schedule"),
    ("trainconfig-device-unknown", lambda ws: zoo.TrainConfig(device="gpu9"), ValueError, "gpu9"),
    ("trainconfig-unknown-field", lambda ws: zoo.TrainConfig.of(zoo.TrainConfig(), lrr=1), TypeError, "lrr"),
    ("train-no-data", lambda ws: zoo.train("shakespeare-char", [], ws / "out" / "a"), ValueError, "data"),
    ("train-missing-data", lambda ws: zoo.train("shakespeare-char", [ws / "nope.txt"], ws / "out" / "b",
                                                tokenizer="char", device="cpu"), FileNotFoundError, "nope.txt"),
    ("train-data-not-utf8", lambda ws: zoo.train("shakespeare-char", [ws / "latin1.txt"], ws / "out" / "c",
                                                 tokenizer="char", device="cpu"), ValueError, "latin1.txt"),
    ("train-data-is-a-folder", lambda ws: zoo.train("shakespeare-char", [ws / "notes"], ws / "out" / "d",
                                                    tokenizer="char", device="cpu"), ValueError, "notes"),
    ("train-resume-without-checkpoint", lambda ws: zoo.train("shakespeare-char", [ws / "text.txt"], ws / "out",
                                                             resume=True), FileNotFoundError, "out"),
    ("train-unknown-preset", lambda ws: zoo.train("gpt3", [ws / "text.txt"], ws / "out" / "e"), ValueError, "gpt3"),
    ("train-neither-preset-nor-init", lambda ws: zoo.train(None, [ws / "text.txt"], ws / "out" / "f"), ValueError,
     "init"),
    ("train-override-wrong-type", lambda ws: zoo.train("shakespeare-char", [ws / "text.txt"], ws / "out" / "g",
                                                       overrides={"n_layer": "abc"}, tokenizer="char", device="cpu"),
     TypeError, "n_layer"),
    ("train-block-size-above-model", lambda ws: zoo.train("shakespeare-char", [ws / "text.txt"], ws / "out" / "h",
                                                          block_size=4096, tokenizer="char", device="cpu"),
     ValueError, "block_size"),
    ("read-texts-not-utf8", lambda ws: data.read_texts([ws / "latin1.txt"]), ValueError, "offset 2"),
    # evaluation and verification
    ("sliding-window-stride-zero", lambda ws: evaluation.sliding_window_loss(model(), ids(100), 16, 0), ValueError,
     "stride"),
    ("sliding-window-above-block", lambda ws: evaluation.sliding_window_loss(model(), ids(100), 128, 64), ValueError,
     "block_size"),
    ("sliding-window-one-token", lambda ws: evaluation.sliding_window_loss(model(), ids(1), 16, 8), ValueError,
     "token"),
    ("verify-too-few-tokens", lambda ws: zoo.verify(ws / "model", n_tokens=0), ValueError, "n_tokens"),
    ("verify-missing-source", lambda ws: zoo.verify(ws / "nope"), FileNotFoundError, "nope"),
]

# The model files' own contract, on each of the four transformers: (id, call(arch), text in the message)
MODEL = [
    ("decode-before-setup-cache", lambda a: tiny(a)(ids(1, 1), input_pos=torch.tensor([0])), "setup_cache"),
    ("more-tokens-than-the-cache", lambda a: cached(a, S=8)(ids(1, 10), input_pos=torch.arange(10)), "8 slots"),
    ("prefill-past-the-cache", lambda a: cached(a, S=8)(ids(1, 2), input_pos=torch.tensor([7, 8])), "slot 8"),
    ("decode-step-past-the-cache", lambda a: cached(a, S=8)(ids(1, 1), input_pos=torch.tensor([8])), "slot 8"),
    ("batch-larger-than-the-cache", lambda a: cached(a, B=1)(ids(2, 1), input_pos=torch.tensor([0])),
     "setup_cache(2"),
    ("batch-smaller-than-the-cache", lambda a: cached(a, B=3)(ids(2, 1), input_pos=torch.tensor([0])), "holds 3"),
    ("input-pos-wrong-length", lambda a: cached(a)(ids(1, 2), input_pos=torch.tensor([0])), "input_pos"),
    ("reorder-before-setup-cache", lambda a: tiny(a).reorder_cache(torch.tensor([0])), "setup_cache"),
    ("cache-longer-than-block-size", lambda a: tiny(a).setup_cache(1, 65), "block_size"),
    ("cache-of-no-rows", lambda a: tiny(a).setup_cache(0, 8), "batch_size"),
    ("idx-floats", lambda a: tiny(a)(torch.ones(1, 4)), "token ids"),
    ("idx-one-dimensional", lambda a: tiny(a)(ids(4)), "[batch, tokens]"),
    ("sequence-longer-than-block-size", lambda a: tiny(a)(ids(1, 65)), "block_size"),
    ("bidirectional-setup-cache", lambda a: tiny(a, causal=False).setup_cache(1, 8), "causal=False"),
]
ARCHS = ["gpt2", "llama-gqa", "mqa", "scratchformer", "gemma2"]


@pytest.mark.parametrize("call, error, culprit", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api(ws, call, error, culprit):
    before = snapshot(ws)
    with pytest.raises(error) as e:
        call(ws)
    assert type(e.value) is error, f"{type(e.value).__name__}: {e.value}"  # exactly: no UnicodeDecodeError
    assert culprit in str(e.value), f"the message does not name {culprit!r}: {e.value}"
    assert snapshot(ws) == before, "a refused call changed files"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("call, culprit", [c[1:] for c in MODEL], ids=[c[0] for c in MODEL])
def test_model_contract(arch, call, culprit):
    with pytest.raises(ValueError) as e:
        call(arch)
    assert culprit in str(e.value), f"the message does not name {culprit!r}: {e.value}"


def test_the_contract_checks_leave_valid_decoding_alone():
    """The checks refuse only misuse: prefill then one step per slot up to the last one, and a beam reorder that
    grows the batch, all decode."""
    for arch in ARCHS:
        m = cached(arch, B=1, S=8)
        m(ids(1, 3), input_pos=torch.arange(3))
        for t in range(3, 8):
            m(ids(1, 1), input_pos=torch.tensor([t]))
        m.reorder_cache(torch.tensor([0, 0, 0]))
        assert m(ids(3, 1), input_pos=torch.tensor([7])).shape == (3, 1, 37)


# ------------------------------------------------------------------------------------------ command line

CLI = [  # (id, argv(ws), text the error line must contain)
    ("generate-temperature-nan", lambda ws: ["generate", ws / "model", "--prompt", "a", "--temperature", "nan"],
     "temperature"),
    ("generate-max-new-negative", lambda ws: ["generate", ws / "model", "--prompt", "a", "--max-new-tokens", "-1"],
     "--max-new-tokens"),
    ("generate-beams-zero", lambda ws: ["generate", ws / "model", "--prompt", "a", "--beams", "0"], "num_beams"),
    ("generate-top-p-above-1", lambda ws: ["generate", ws / "model", "--prompt", "a", "--top-p", "2"], "top_p"),
    ("generate-missing-source", lambda ws: ["generate", ws / "nope", "--prompt", "a"], "nope"),
    ("generate-device-unknown", lambda ws: ["generate", ws / "model", "--prompt", "a", "--device", "gpu9"], "gpu9"),
    ("generate-dtype-unknown", lambda ws: ["generate", ws / "model", "--prompt", "a", "--dtype", "float99"],
     "float99"),
    ("generate-text-outside-vocabulary", lambda ws: ["generate", ws / "model", "--prompt", "XYZ"], "'X'"),
    ("generate-beams-with-temperature", lambda ws: ["generate", ws / "model", "--prompt", "a", "--beams", "2",
                                                    "--temperature", "0.9"], "temperature"),
    ("generate-beams-with-seed", lambda ws: ["generate", ws / "model", "--prompt", "a", "--beams", "2", "--seed",
                                             "1"], "seed"),
    ("generate-preset-typo", lambda ws: ["generate", "smollm2-135m-instruc", "--prompt", "a"],
     "close preset names: smollm2-135m-instruct"),
    ("generate-gguf-adapter", lambda ws: ["generate", ws / "model", "--prompt", "a", "--adapter",
                                          ws / "adapter.gguf"], "PEFT LoRA adapter folder"),
    ("generate-run-folder", lambda ws: ["generate", ws / "run", "--prompt", "a"], str(Path("run", "step-0000010"))),
    ("inspect-out-is-a-file", lambda ws: ["inspect", ws / "model", "--prompt", "a", "--logit-lens", "--out",
                                          ws / "afile"], "--out"),
    ("eval-stride-zero", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--stride", "0"], "--stride"),
    ("eval-tasks-with-data-flags", lambda ws: ["eval", ws / "model", "--tasks", "hellaswag", "--window", "64"],
     "--window goes with --data"),
    ("eval-two-dtypes", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--bf16", "--dtype", "float16"],
     "--bf16 and --dtype float16"),
    ("eval-masks-without-mlm", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--mask-prob", "0.5"],
     "--mask-prob sets the masks of --objective mlm"),
    ("eval-batch-size-zero", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--batch-size", "0"],
     "--batch-size"),
    ("eval-window-zero", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--window", "0"], "--window"),
    ("eval-window-one", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--window", "1"],
     "--window must be at least 2"),
    ("eval-output-with-data", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--output",
                                          ws / "r.json"], "--output goes with --tasks"),
    ("eval-include-path-with-data", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--include-path",
                                                ws / "notes"], "--include-path goes with --tasks"),
    ("eval-window-above-block", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--window", "1000"],
     "block_size"),
    ("eval-batch-size-not-a-number", lambda ws: ["eval", ws / "model", "--data", ws / "text.txt", "--batch-size",
                                                 "x"], "--batch-size"),
    ("eval-missing-data", lambda ws: ["eval", ws / "model", "--data", ws / "nope.txt"], "nope.txt"),
    ("eval-data-not-utf8", lambda ws: ["eval", ws / "model", "--data", ws / "latin1.txt"], "latin1.txt"),
    ("eval-data-is-a-folder", lambda ws: ["eval", ws / "model", "--data", ws / "notes"], "notes"),
    ("eval-missing-source", lambda ws: ["eval", ws / "nope", "--data", ws / "text.txt"], "nope"),
    ("eval-torn-checkpoint", lambda ws: ["eval", ws / "torn", "--data", ws / "text.txt"], "model.safetensors"),
    ("train-set-not-a-number", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                           ws / "out" / "t1", "--tokenizer", "char", "--set", "n_layer=abc"],
     "n_layer"),
    ("train-set-without-value", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                            ws / "out" / "t2", "--set", "n_layer"], "FIELD=VALUE"),
    ("train-set-unknown-field", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                            ws / "out" / "t3", "--tokenizer", "char", "--set", "n_foo=1"], "n_foo"),
    ("train-lr-nan", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out", ws / "out" / "t4",
                                 "--lr", "nan"], "lr"),
    ("train-schedule-unknown", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                           ws / "out" / "t5", "--schedule", "linear"], "linear"),
    ("train-missing-data", lambda ws: ["train", "shakespeare-char", "--data", ws / "nope.txt", "--out",
                                       ws / "out" / "t6", "--tokenizer", "char"], "nope.txt"),
    ("train-data-not-utf8", lambda ws: ["train", "shakespeare-char", "--data", ws / "latin1.txt", "--out",
                                        ws / "out" / "t7", "--tokenizer", "char"], "latin1.txt"),
    ("train-resume-nothing", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out", ws / "out",
                                         "--resume"], "out"),
    ("train-unknown-preset", lambda ws: ["train", "gpt3", "--data", ws / "text.txt", "--out", ws / "out" / "t8"],
     "gpt3"),
    ("train-tokenizer-unknown", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                            ws / "out" / "t9", "--tokenizer", "bogus"], "takes char"),
    ("train-bpe-vocab-too-small", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                              ws / "out" / "t10", "--tokenizer", "bpe"], "--set vocab_size=N"),
    ("train-out-inside-a-file", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                            ws / "afile" / "sub", *TINY_ARGV], "is inside"),
    ("train-out-holds-other-files", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                                ws / "notes", *TINY_ARGV], "not a zoo run (todo.txt)"),
    ("train-init-set-changes-shapes", lambda ws: ["train", "--init", ws / "model", "--data", ws / "text.txt",
                                                  "--out", ws / "out" / "t11", "--set", "n_layer=3"],
     "(--set) n_layer=3 (it holds 2)"),
    ("train-resume-and-overwrite", lambda ws: ["train", "shakespeare-char", "--data", ws / "text.txt", "--out",
                                               ws / "out", "--resume", "--overwrite"], "give one of them"),
    ("verify-tokens-zero", lambda ws: ["verify", ws / "model", "--tokens", "0"], "--tokens"),
    ("verify-tol-nan", lambda ws: ["verify", ws / "model", "--tol", "nan"], "--tol"),
    ("verify-missing-text", lambda ws: ["verify", ws / "model", "--text", ws / "nope.txt"], "nope.txt"),
    ("verify-text-not-utf8", lambda ws: ["verify", ws / "model", "--text", ws / "latin1.txt"], "latin1.txt"),
    ("unknown-command", lambda ws: ["frobnicate"], "frobnicate"),
    ("no-command", lambda ws: [], "COMMAND"),
]


@pytest.mark.parametrize("argv, culprit", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli(ws, argv, culprit, zoo_main):
    argv = argv(ws)
    before = snapshot(ws)
    code, out, err = zoo_main(*argv)
    lines = err.strip().splitlines()
    command = f"zoo {argv[0]}" if argv and not str(argv[0]).startswith("frob") else "zoo"
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    assert culprit in lines[0] and "Traceback" not in err
    assert snapshot(ws) == before, "a refused command changed files"


@pytest.mark.slow
@pytest.mark.parametrize("argv, culprit", [
    (["eval", "{ws}/model", "--data", "{ws}/latin1.txt"], "offset 2"),
    (["train", "shakespeare-char", "--data", "{ws}/text.txt", "--out", "{ws}/out/p", "--set", "n_layer=abc"],
     "n_layer"),
    (["eval", "{ws}/model", "--data", "{ws}/text.txt", "--batch-size", "x"], "invalid int value"),
], ids=["library-error", "set-type", "argparse-error"])
def test_cli_in_a_real_process(ws, argv, culprit):
    """`python -m zoo` itself: exit status 2, one error line, no traceback."""
    before = snapshot(ws)
    out = subprocess.run([sys.executable, "-m", "zoo", *[a.format(ws=ws) for a in argv]], capture_output=True,
                         text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"zoo {argv[0]}: error: ") and culprit in lines[0]
    assert snapshot(ws) == before


@pytest.mark.parametrize("argv", [
    ["generate", "{ws}/model", "--prompt", "a"], ["chat", "{ws}/model"],
    ["eval", "{ws}/model", "--data", "{ws}/text.txt"], ["inspect", "{ws}/model", "--prompt", "a", "--logit-lens"],
    ["serve", "{ws}/model"],
    ["train", "shakespeare-char", "--data", "{ws}/text.txt", "--out", "{ws}/out/t9"]], ids=lambda argv: argv[0])
def test_cli_device_this_torch_cannot_reach(ws, argv, zoo_main, monkeypatch):
    """--device cuda (mps) where torch finds none (here made to) is refused before anything loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    before = snapshot(ws)
    for device in ("cuda", "cuda:0", "mps"):
        code, _, err = zoo_main(*[a.format(ws=ws) for a in argv], "--device", device)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"zoo {argv[0]}: error: device {device!r} is not available") and \
            "--device cpu" in lines[0]
    assert snapshot(ws) == before


def test_api_device_this_torch_cannot_reach(ws, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: zoo.from_pretrained(ws / "model", device="cuda"), lambda: zoo.load("bigram", device="cuda:0"),
                 lambda: zoo.train("bigram", [ws / "text.txt"], ws / "out" / "gpu", tokenizer="char", device="cuda")):
        with pytest.raises(ValueError, match="'cuda(:0)?' is not available: this torch"):
            call()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU: cuda:1 names none
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:1' is not available: this machine has 1 cuda device"):
        zoo.load("bigram", device="cuda:1")


def test_serve_refuses_a_port_in_use_before_loading(ws, zoo_main):
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'zoo-lm[serve]')")
    pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install 'zoo-lm[serve]')")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = zoo_main("serve", ws / "model", "--port", port)
    assert code == 2 and err.strip() == f"zoo serve: error: port {port} on 127.0.0.1 is in use; pick another --port"


@pytest.fixture
def hub_offline(monkeypatch):
    """`datasets` in offline mode, as HF_DATASETS_OFFLINE sets it (the datasets asked for are in no cache)."""
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'zoo-lm[datasets]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # (what the variable sets at import)
    return datasets


def test_hf_data_the_hub_cannot_give(ws, zoo_main, hub_offline, monkeypatch):
    code, _, err = zoo_main("train", "shakespeare-char", "--data", "hf:nosuch-org/nosuch-data", "--out",
                            ws / "out" / "t10", *TINY_ARGV)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("zoo train: error: dataset 'hf:nosuch-org/nosuch-data"
                                                                  "' is not in the Hugging Face cache and "
                                                                  "HF_DATASETS_OFFLINE is set"), err
    assert not (ws / "out" / "t10").exists()

    def unreachable(*args, **kwargs):  # as `datasets` says it when the network is down
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (ConnectError)")
    monkeypatch.setattr(hub_offline.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_offline, "load_dataset", unreachable)
    with pytest.raises(FileNotFoundError, match="'hf:wikitext': could not reach the Hugging Face hub and it is not in "
                                                "the cache; check the network"):
        data.read_texts(["hf:wikitext"])


def test_harness_tasks_whose_data_the_hub_cannot_give(tmp_path, hub_offline):
    """What `zoo eval --tasks` runs: a task whose dataset is in no cache is a FileNotFoundError naming it."""
    harness = pytest.importorskip("zoo.harness", reason="lm-evaluation-harness is not installed (pip install "
                                                        "'zoo-lm[eval]')")
    (tmp_path / "remote.yaml").write_text(
        "task: remote_task\ndataset_path: nosuch-org/nosuch-data\noutput_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: '{{text}}'\ndoc_to_target: ' a'\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n")
    lm = harness.ZooLM(model=tiny("gpt2"), tokenizer=CharTokenizer("abcdefghij \n"), prefix_token_id=0)
    with pytest.raises(FileNotFoundError, match=r"the data of remote_task \(.*nosuch-org/nosuch-data.*\) is not in "
                                                "the Hugging Face cache and HF_DATASETS_OFFLINE is set"):
        harness.evaluate(lm, "remote_task", include_path=tmp_path)


def test_catalogue_size():
    """The issue asks for at least 60 kinds of wrong input, across the API, the model files and the CLI."""
    assert len(API) + len(MODEL) + len(CLI) >= 60 and min(len(API), len(MODEL), len(CLI)) >= 10


# ------------------------------------------------------------------------------------------ interrupted training

def zoo_train(out, text, *extra, **popen):
    argv = [sys.executable, "-m", "zoo", "train", "shakespeare-char", "--data", str(text), "--out", str(out),
            "--tokenizer", "char", "--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32",
            "--block-size", "32", "--batch-size", "4", "--device", "cpu", "--no-bf16", "--no-progress",
            "--schedule", "constant", "--warmup", "5", "--eval-interval", "20", "--eval-iters", "2",
            "--log-interval", "10", "--checkpoint-interval", "20", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZOO_CACHE": str(Path(out).parent / "cache")}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_sigkill_during_training_then_resume_gives_the_uninterrupted_result(tmp_path):
    """A run killed with SIGKILL (no cleanup at all) leaves only whole checkpoints; --resume from the newest
    ends exactly where an uninterrupted run does (same weights)."""
    text = tmp_path / "text.txt"
    text.write_text("".join("abcdefghij \n"[(i * i + i // 7) % 12] for i in range(20_000)))
    steps = 200
    ref = zoo_train(tmp_path / "ref", text, "--max-iters", str(steps))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()

    run = zoo_train(tmp_path / "run", text, "--max-iters", str(steps))
    first = tmp_path / "run" / "step-0000020"
    while not first.exists() and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    saved = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert saved and f"step-{steps:07d}" not in saved  # killed part-way
    for name in saved:  # every checkpoint that carries the name is whole
        zoo.from_pretrained(tmp_path / "run" / name)
        torch.load(tmp_path / "run" / name / "training_state.pt", weights_only=True)

    resumed = zoo_train(tmp_path / "run", text, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    final = f"step-{steps:07d}/model.safetensors"
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "ref" / final), load_file(tmp_path / "run" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ output folders
# zoo.train(..., overwrite=True) / `zoo train --overwrite`, refusing a folder that holds a run, and falling back
# from a damaged newest checkpoint.

TINY_RUN = dict(overrides=dict(n_layer=1, n_head=2, n_embd=32), tokenizer="char", block_size=32, batch_size=4,
                device="cpu", bf16=False, progress=False, schedule="constant", warmup=2, eval_interval=4,
                eval_iters=2, log_interval=2, checkpoint_interval=4)


# the same, as flags (short: until the lead's refusal lands, these commands train)
TINY_ARGV = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32", "--tokenizer", "char", "--block-size",
             "32", "--batch-size", "4", "--device", "cpu", "--no-bf16", "--no-progress", "--max-iters", "2"]


@pytest.fixture
def a_run(tmp_path, monkeypatch):
    """A finished tiny run (checkpoints at steps 4 and 8) and its text file."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("abcdefghij \n" * 500)
    zoo.train("shakespeare-char", [text], tmp_path / "run", max_iters=8, **TINY_RUN)
    return tmp_path / "run", text


@pytest.mark.slow
def test_train_refuses_a_folder_holding_a_run(a_run):
    out, text = a_run
    before = snapshot(out)
    with pytest.raises((ValueError, FileExistsError)) as e:
        zoo.train("shakespeare-char", [text], out, max_iters=4, **TINY_RUN)
    assert str(out) in str(e.value) and "resume" in str(e.value) and "overwrite" in str(e.value)
    assert snapshot(out) == before


@pytest.mark.slow
def test_train_overwrite_starts_again_without_mixing_runs(a_run):
    out, text = a_run
    zoo.train("shakespeare-char", [text], out, max_iters=4, overwrite=True, **TINY_RUN)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000004"]  # the old step-0000008 is not mixed in
    assert max(json.loads(line)["step"] for line in open(out / "log.jsonl")) == 4


@pytest.mark.slow
def test_cli_train_refuses_a_folder_holding_a_run(a_run, zoo_main):
    out, text = a_run
    before = snapshot(out)
    code, _, err = zoo_main("train", "shakespeare-char", "--data", text, "--out", out, *TINY_ARGV)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("zoo train: error: ")
    assert str(out) in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert snapshot(out) == before


def test_cli_train_out_naming_a_regular_file(ws, zoo_main):
    before = snapshot(ws)
    code, _, err = zoo_main("train", "shakespeare-char", "--data", ws / "text.txt", "--out", ws / "afile",
                            *TINY_ARGV)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("zoo train: error: ") and "afile" in lines[0]
    assert snapshot(ws) == before


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["training_state.pt", "model.safetensors"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(a_run, damaged, caplog):
    out, text = a_run
    file = out / "step-0000008" / damaged
    torn = file.read_bytes()[:file.stat().st_size // 2]
    file.write_bytes(torn)
    with caplog.at_level("WARNING", logger="zoo"):
        zoo.train("shakespeare-char", [text], out, resume=True, max_iters=12, progress=False)
    assert str(file) in caplog.text  # says which file is damaged
    kept = [p for p in out.rglob(damaged) if p.read_bytes() == torn]
    assert kept, "the damaged file was deleted or rewritten"  # (it may have been moved aside)
    assert (out / "step-0000012").is_dir()  # continued from step 4, the newest intact checkpoint
    assert math.isfinite(json.loads((out / "log.jsonl").read_text().splitlines()[-1]).get("val_loss", 0.0))
