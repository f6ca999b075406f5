"""The command line end to end: `python -m zoo` in a subprocess for each command's first run (the process as a user
starts it), then zoo.cli.main in this process (the zoo_main fixture) for its variations and refusals."""
import subprocess
import sys

import pytest
import torch

import zoo


def zoo_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_list_shows_presets_sizes_sources_and_licences(zoo_main):
    code, out, err = zoo_main("list")
    assert code == 0, err
    lines = out.splitlines()
    gpt2 = next(line for line in lines if line.split()[0] == "gpt2")
    assert "124.4M" in gpt2 and "openai-community/gpt2" in gpt2 and "mit" in gpt2
    smollm = next(line for line in lines if line.split()[0] == "smollm2-135m-instruct")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in smollm and "apache-2.0" in smollm
    assert {line.split()[0] for line in lines[1:]} == set(zoo.list())


@pytest.mark.slow
def test_generate_refuses_bad_settings_before_loading(zoo_main):
    code, _, err = zoo_main("generate", "--prompt", "hi", "--temperature", "-1")
    assert code == 2 and "temperature" in err and "Traceback" not in err
    code, _, err = zoo_main("generate", "no-such-model-gtp2", "--prompt", "hi")
    assert code == 2 and "no-such-model-gtp2" in err and "Traceback" not in err
    for flags in (["--top-p", "0.9"], ["--top-k", "5", "--seed", "1"]):  # greedy by default: they would do nothing
        code, _, err = zoo_main("generate", "no-such-model-gtp2", "--prompt", "hi", *flags)
        assert code == 2 and f"{flags[0]} " in err and "--temperature" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_generate_from_a_local_folder(tmp_path, gpt2_bpe, zoo_main):
    tok = zoo.tokenizer("gpt2")
    torch.manual_seed(0)
    model = zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, block_size=32))
    zoo.save_pretrained(model, tmp_path / "tiny", tokenizer=tok)
    args = ["generate", str(tmp_path / "tiny"), "--prompt", "Hello", "--max-new-tokens", "40", "--seed", "0",
            "--temperature", "1", "--top-k", "20", "--device", "cpu"]
    out = zoo_cli(*args)
    assert out.returncode == 0, out.stderr
    summary = out.stderr.strip().splitlines()[-1]
    assert "40 new tokens" in summary and "tok/s" in summary and str(tmp_path / "tiny") in summary
    # the text is what zoo.complete writes with the same settings (40 tokens: past block_size 32)
    expected = zoo.complete(model, tok, "Hello", max_new_tokens=40, seed=0, top_k=20)
    assert out.stdout == expected + "\n"
    assert zoo_main(*args)[1] == out.stdout  # --seed reproduces it
    # a reader that leaves early (`| head -c 1`): no traceback
    proc = subprocess.Popen([sys.executable, "-m", "zoo", "generate", str(tmp_path / "tiny"), "--prompt", "Hello",
                             "--max-new-tokens", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    assert proc.wait(300) == 1 and b"Traceback" not in proc.stderr.read()

    # --compile: the same greedy text, and a summary that keeps compiling apart from the speed
    code, out, err = zoo_main("generate", tmp_path / "tiny", "--prompt", "Hello", "--max-new-tokens", "20", "--compile",
                              "--device", "cpu")
    assert code == 0, err
    assert "(compiling)" in err.strip().splitlines()[-1]
    assert out == zoo.complete(model, tok, "Hello", max_new_tokens=20, temperature=0) + "\n"

    # a folder saved without its tokenizer: the error names --tokenizer, which takes another source's
    zoo.save_pretrained(model, tmp_path / "bare")
    code, _, err = zoo_main("generate", tmp_path / "bare", "--prompt", "Hello", "--max-new-tokens", "5")
    assert code == 2 and "no tokenizer in" in err and "--tokenizer SOURCE" in err and len(err.splitlines()) == 1, err
    code, out, err = zoo_main("generate", tmp_path / "bare", "--tokenizer", "gpt2", "--prompt", "Hello",
                              "--max-new-tokens", "5")
    assert code == 0 and out == zoo.complete(model, tok, "Hello", max_new_tokens=5, temperature=0) + "\n", err
    code, out, err = zoo_main("generate", tmp_path / "tiny", "--draft", tmp_path / "bare", "--prompt", "Hello",
                              "--max-new-tokens", "5")  # a draft needs no tokenizer of its own (it wanted one)
    assert code == 0 and out == zoo.complete(model, tok, "Hello", max_new_tokens=5, temperature=0) + "\n", err
    (tmp_path / "text.txt").write_text("Hello there.")
    zoo.save_pretrained(zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, vocab_size=97)), tmp_path / "small")
    for command in (["generate", "--prompt", "Hello"], ["eval", "--data", tmp_path / "text.txt"]):  # (it crashed)
        code, _, err = zoo_main(command[0], tmp_path / "small", "--tokenizer", "gpt2", *command[1:])
        assert code == 2 and "50257 tokens, more than the 97" in err, err


@pytest.mark.slow
def test_generate_with_a_draft_writes_the_plain_greedy_text(tmp_path, gpt2_bpe, zoo_main):
    tok = zoo.tokenizer("gpt2")
    for seed, name in ((0, "tiny"), (1, "draft")):
        torch.manual_seed(seed)
        zoo.save_pretrained(zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, block_size=64)), tmp_path / name,
                            tokenizer=tok)
    prompt = "the cat sat on the mat, the cat sat on the"
    expected = zoo.complete(zoo.from_pretrained(tmp_path / "tiny"), tok, prompt, max_new_tokens=30, temperature=0)
    base = ["generate", str(tmp_path / "tiny"), "--prompt", prompt, "--max-new-tokens", "30", "--device", "cpu"]
    out = zoo_cli(*base, "--prompt-lookup")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "drafted tokens accepted" in out.stderr.strip().splitlines()[-1]
    for draft in (["--draft", tmp_path / "draft", "--num-draft", "3"],
                  ["--draft", tmp_path / "tiny", "--draft-quantize", "int8"],
                  ["--draft", tmp_path / "draft", "--compile"]):  # (the draft's step compiled)
        code, out, err = zoo_main(*base, *draft)
        assert code == 0, err
        assert out == expected + "\n"
        assert "drafted tokens accepted" in err.strip().splitlines()[-1]
    for bad, message in ((["--prompt-lookup", "--num-draft", "0"], "--num-draft must be >= 1"),
                         (["--num-draft", "3"], "add --draft SOURCE or --prompt-lookup"),
                         (["--draft-quantize", "int4"], "add --draft SOURCE"),
                         (["--prompt-lookup", "--compile"], "--prompt-lookup has none")):
        code, _, err = zoo_main(*base, *bad)
        assert code == 2 and message in err and err.startswith("zoo generate: error:") and "Traceback" not in err, err


@pytest.mark.slow
def test_generate_chat_answers_paris(smollm2_gguf):
    """README's first command: greedy by default, so the answer is the same every time."""
    out = zoo_cli("generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "30",
                  "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    summary = out.stderr.strip().splitlines()[-1]
    assert "new tokens" in summary and "tok/s" in summary and "SmolLM2-135M-Instruct" in summary
