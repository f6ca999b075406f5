"""zoo.score / zoo.score_rolling against one forward per pair, and the "zoo" lm-evaluation-harness model against
the harness's own Hugging Face backend (`hf`) on the same weights: local tasks (YAML + JSONL written to a temp
folder, so no hub download) of each request type, compared metric by metric and request by request."""
import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.evaluation import sliding_window_loss

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'zoo-lm[test]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The harness loads the tasks' local JSON files through `datasets`; keep it from asking the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------------
# zoo.score and zoo.score_rolling


def random_model(arch, **config):
    torch.manual_seed(0)
    model = zoo.build(arch, config).eval()
    with torch.no_grad():  # larger weights than the init's: peaked logits, so a wrong position shows
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


ARCHS = {
    "gpt2": dict(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=300),
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=48, vocab_size=300),
    "mqa": dict(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=300),
    "gemma": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, ffn_dim=40, block_size=48, vocab_size=300,
                  sliding_window=6, layer_types=["sliding_attention", "full_attention"], attn_softcap=20.0,
                  final_softcap=30.0, sandwich_norms=True),
    "bigram": dict(vocab_size=300, block_size=48),
}


@torch.no_grad()
def one_forward_per_pair(model, pairs):
    """What the harness's hf backend computes: the last block_size + 1 tokens of context + continuation, the
    model reading all but the last; log-softmax at the continuation's positions."""
    block, out = model.config.block_size, []
    for context, continuation in pairs:
        inp = (context + continuation)[-(block + 1):][:-1]
        logp = F.log_softmax(model(torch.tensor([inp])).float(), -1)[0, -len(continuation):]
        target = torch.tensor(continuation)
        out.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


def pairs_for(model, seed=0):
    """Contexts of 1..60 tokens (some longer than block_size, so truncated), each with 1-4 continuations of
    1..20 tokens, and among them the model's own greedy continuations (greedy=True) and one token off."""
    rng, V = random.Random(seed), model.config.vocab_size
    pairs = []
    for _ in range(12):
        context = [rng.randrange(V) for _ in range(rng.randrange(1, 61))]
        for _ in range(rng.randrange(1, 5)):
            pairs.append((context, [rng.randrange(V) for _ in range(rng.randrange(1, 21))]))
        prompt = context[-(model.config.block_size - 8):]
        greedy = zoo.generate(model, prompt, rng.randrange(1, 8), temperature=0, eos_token_id=[])[0]
        pairs.append((prompt, greedy))
        pairs.append((prompt, greedy[:-1] + [(greedy[-1] + 1) % V]))
    return pairs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_score_equals_one_forward_per_pair(arch):
    model = random_model(arch, **ARCHS[arch])
    pairs = pairs_for(model)
    ref = one_forward_per_pair(model, pairs)
    assert sum(g for _, g in ref) >= 12  # the greedy flag is tested both ways
    for batch_size in (1, 5, 64):
        got = zoo.score(model, pairs, batch_size=batch_size)
        assert [g for _, g in got] == [g for _, g in ref], batch_size
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in ref], abs=1e-4), batch_size


def test_score_shares_a_context_between_its_continuations():
    """Pairs with one context are read in one prefill: the model sees that context once per batch."""
    model = random_model("gpt2", **ARCHS["gpt2"])
    context = list(range(30))
    pairs = [(context, [c, c + 1]) for c in range(40, 48)]
    rows = []
    hook = model.transformer.wte.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    try:
        got = zoo.score(model, pairs, batch_size=16)
    finally:
        hook.remove()
    assert rows == [(1, 30), (8, 1)]  # one context row, then eight one-token continuation rows
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in one_forward_per_pair(model, pairs)], abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_rolling_is_zoo_evals_sliding_window(arch):
    model = random_model(arch, **ARCHS[arch])
    ids = torch.randint(300, (257,), generator=torch.Generator().manual_seed(1))
    for window, stride in [(48, 24), (48, 47), (20, 1), (32, 13)]:
        total = zoo.score_rolling(model, ids.tolist(), window=window, stride=stride, batch_size=3)
        mean = sliding_window_loss(model, ids, window, stride, batch_size=4)
        assert total == pytest.approx(-mean * (len(ids) - 1), rel=1e-6), (window, stride)
    assert zoo.score_rolling(model, ids.tolist()) == pytest.approx(
        -sliding_window_loss(model, ids, 48, 24) * (len(ids) - 1), rel=1e-6)


def test_score_refuses_bad_input_naming_it():
    model = random_model("gpt2", **ARCHS["gpt2"])
    with pytest.raises(ValueError, match="pair 1 has an empty context"):
        zoo.score(model, [([1], [2]), ([], [2])])
    with pytest.raises(ValueError, match="pair 0 has an empty continuation"):
        zoo.score(model, [([1], [])])
    with pytest.raises(ValueError, match="block_size"):
        zoo.score(model, [([1], list(range(49)))])
    with pytest.raises(ValueError, match="pair 0's continuation has token ids outside"):
        zoo.score(model, [([1], [300])])
    with pytest.raises(ValueError, match="batch_size"):
        zoo.score(model, [([1], [2])], batch_size=0)
    with pytest.raises(ValueError, match="stride"):
        zoo.score_rolling(model, list(range(100)), window=16, stride=16)
    bidirectional = random_model("gpt2", **ARCHS["gpt2"], causal=False)
    with pytest.raises(ValueError, match="causal"):
        zoo.score(bidirectional, [([1], [2])])


# ---------------------------------------------------------------------------------------------------------
# The harness model against the harness's hf backend

TASKS = ["zoo_mc", "zoo_roll", "zoo_gen", "zoo_last"]


def paragraphs(text):
    return [line.strip() for line in text.splitlines() if len(line.split()) > 40 and not line.strip().startswith("=")]


def sentences(paragraph):
    return [s.strip() + " ." for s in paragraph.split(" . ") if len(s.split()) > 10]


def write_tasks(folder, text, n, greedy=None):
    """Four local tasks of n items from wikitext paragraphs: zoo_mc (multiple_choice: a paragraph's third
    sentence among three from elsewhere; acc, acc_norm), zoo_roll (loglikelihood_rolling: paragraphs; word
    and byte perplexity), zoo_gen (generate_until: the words after a sentence's first eight; exact match) and
    zoo_last (loglikelihood, as LAMBADA: a sentence's last word; perplexity and acc, whether it is greedy).
    greedy(context) -> text, when given, supplies every other zoo_last target (so that some are greedy)."""
    rng = random.Random(0)
    pars = paragraphs(text)
    pool = [s for p in pars for s in sentences(p)]
    mc, roll, gen, last = [], [], [], []
    for i, p in enumerate(pars):
        s = sentences(p)
        if len(s) >= 3 and len(mc) < n:
            right, wrong = " ".join(s[2].split()[:25]), [" ".join(rng.choice(pool).split()[:25]) for _ in range(3)]
            label = rng.randrange(4)
            mc.append({"context": " ".join(s[:2]), "choices": wrong[:label] + [right] + wrong[label:], "label": label})
        if len(roll) < n:
            roll.append({"text": " ".join(p.split()[:rng.randrange(20, 250)])})
        if s and len(gen) < n:
            words = s[0].split()
            gen.append({"question": " ".join(words[:8]), "answer": words[8]})
        if s and len(last) < n:
            words = s[-1].split()[:-1]  # without the final " ."
            context = " ".join(words[:-1])
            target = greedy(context) if greedy and len(last) % 2 == 0 else " " + words[-1]
            last.append({"context": context, "target": target})
    assert min(map(len, (mc, roll, gen, last))) == n, "not enough text for the tasks"
    for name, rows in [("mc", mc), ("roll", roll), ("gen", gen), ("last", last)]:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def task(name, data, body):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}.jsonl\n"
            f"test_split: test\n{body}")

    metrics = lambda *names: "metric_list:\n" + "".join(  # noqa: E731
        f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: {hib}\n" for m, agg, hib in names)
    task("zoo_mc", "mc", 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
         'doc_to_target: "{{label}}"\n' + metrics(("acc", "mean", "true"), ("acc_norm", "mean", "true")))
    task("zoo_roll", "roll", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         + metrics(("word_perplexity", "weighted_perplexity", "false"),
                   ("byte_perplexity", "weighted_perplexity", "false"), ("bits_per_byte", "bits_per_byte", "false")))
    task("zoo_gen", "gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: " {{answer}}"\n'
         'generation_kwargs:\n  until: ["\\n", "."]\n  do_sample: false\n  max_gen_toks: 12\n'
         + metrics(("exact_match", "mean", "true")))
    task("zoo_last", "last", 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
         + metrics(("perplexity", "perplexity", "false"), ("acc", "mean", "true")))
    return folder


def evaluate(model, model_args, folder, tasks=TASKS, **kwargs):
    import zoo.harness  # noqa: F401  (registers "zoo")
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(folder), include_defaults=False)  # the harness's own tasks: not needed
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, device="cpu", batch_size=8,
                                   task_manager=manager, log_samples=True, verbosity="ERROR", **kwargs)


def assert_same_results(ours, theirs, tasks=TASKS, n=20):
    """Metric by metric: accuracies and exact matches identical, perplexities to 4 significant digits (here
    6); request by request: log-likelihoods within 1e-4 (a rolling document's total, summed over its windows
    in float32 by the hf backend, to 1e-6 of itself), the same greedy flags and generations."""
    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        for metric, value in b.items():
            if metric.startswith(("acc", "exact_match")) and "stderr" not in metric:
                assert a[metric] == value, (task, metric)
            elif metric.endswith("perplexity,none") or metric.startswith("bits_per_byte,"):
                assert a[metric] == pytest.approx(value, rel=1e-6), (task, metric)
        sa, sb = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in sa] == [s["doc_id"] for s in sb]
        assert len(sa) >= n  # every item of the task answered
        for x, y in zip(sa, sb):
            for (r,), (s,) in zip(x["resps"], y["resps"], strict=True):
                if task == "zoo_gen":
                    assert r == s, (task, x["doc_id"])
                elif task == "zoo_roll":
                    assert r == pytest.approx(s, rel=1e-6, abs=1e-4), (task, x["doc_id"])
                else:
                    assert r[0] == pytest.approx(s[0], abs=1e-4) and r[1] == s[1], (task, x["doc_id"])


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, gpt2_bpe, transformers):
    """A random 2-layer GPT-2 with GPT-2's tokenizer, in a Hugging Face folder (for the hf backend) and in
    memory, with a block_size of 64 so that the tasks' long texts are truncated and rolled over windows."""
    folder = tmp_path_factory.mktemp("tiny-gpt2") / "model"
    model = random_model("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=64)
    tok = zoo.tokenizer("gpt2")
    zoo.save_pretrained(model, folder, tokenizer=tok)
    return folder, model, tok


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory, tiny_gpt2, shared_data):
    _, model, tok = tiny_gpt2

    def greedy(context):
        return tok.decode(zoo.generate(model, tok.encode(context)[-56:], 2, temperature=0, eos_token_id=[])[0])
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    return write_tasks(tmp_path_factory.mktemp("tasks"), text, n=24, greedy=greedy)


@pytest.fixture(scope="module")
def tiny_results(tiny_gpt2, tiny_tasks):
    """The four tasks through the zoo model and through the hf backend, each loading the folder."""
    folder = tiny_gpt2[0]
    return (evaluate("zoo", f"source={folder},dtype=float32", tiny_tasks),
            evaluate("hf", f"pretrained={folder},dtype=float32", tiny_tasks))


def test_harness_model_matches_the_hf_backend_on_a_tiny_gpt2(tiny_results):
    ours, theirs = tiny_results
    assert_same_results(ours, theirs)
    last = [r[0][1] for s in ours["samples"]["zoo_last"] for r in s["resps"]]
    assert 0 < sum(last) < len(last)  # some targets greedy, some not: both answers compared
    assert any(len(s["arguments"][0][0]) > 200 for s in ours["samples"]["zoo_mc"])  # contexts were truncated


def test_harness_model_adds_bos_as_the_hf_backend_does(tiny_gpt2, tiny_tasks):
    """add_bos_token=True (GPT-2's tokenizer adds none by itself): both backends put BOS first."""
    folder = tiny_gpt2[0]
    tasks = ["zoo_roll", "zoo_last"]
    ours = evaluate("zoo", f"source={folder},add_bos_token=True", tiny_tasks, tasks=tasks, limit=20)
    theirs = evaluate("hf", f"pretrained={folder},add_bos_token=True", tiny_tasks, tasks=tasks, limit=20)
    assert_same_results(ours, theirs, tasks)
    plain = evaluate("zoo", f"source={folder}", tiny_tasks, tasks=["zoo_last"], limit=20)
    assert [s["resps"] for s in plain["samples"]["zoo_last"]] != [s["resps"] for s in ours["samples"]["zoo_last"]]


@pytest.mark.slow
def test_harness_model_matches_the_hf_backend_on_smollm2(tmp_path, smollm2_gguf, transformers, shared_data):
    """SmolLM2-135M-Instruct from the packaged GGUF: zoo reads the GGUF; the hf backend reads the same
    dequantized weights and tokenizer from the folder zoo.save_pretrained writes (transformers' own GGUF
    reader gives bit-identical logits but takes a minute longer)."""
    model, tok = zoo.load_source(str(smollm2_gguf))
    zoo.save_pretrained(model, tmp_path / "hf", tokenizer=tok)
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    tasks = write_tasks(tmp_path, text, n=6)
    from zoo.harness import ZooLM
    ours = evaluate(ZooLM(model=model, tokenizer=tok, batch_size=8), None, tasks)
    theirs = evaluate("hf", f"pretrained={tmp_path / 'hf'},dtype=float32", tasks)
    assert_same_results(ours, theirs, n=6)
    assert ours["results"]["zoo_mc"]["acc,none"] > 0.4  # a real model: well above chance (0.25)


def test_generate_until_stops_at_stop_strings_and_samples_reproducibly(tiny_gpt2):
    from lm_eval.api.instance import Instance
    from zoo.harness import ZooLM
    _, model, tok = tiny_gpt2
    lm = ZooLM(model=model, tokenizer=tok, batch_size=2)

    def run(prompts, **kwargs):
        return lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)],
                                 disable_tqdm=True)
    prompts = ["The cat sat on the", "A long time ago, in a", "Hello"]
    free = run(prompts, until=[], max_gen_toks=12, do_sample=False)
    assert free == [zoo.complete(model, tok, p, max_new_tokens=12, temperature=0) for p in prompts]
    for text in free:  # stop at a piece of each greedy text: the output ends just before it
        stop = text[len(text) // 2:len(text) // 2 + 2]
        if not stop.strip():
            continue
        assert run([prompts[free.index(text)]], until=[stop], max_gen_toks=12) == [text[:text.find(stop)]]
    torch.manual_seed(1)
    sampled = run(prompts, until=["\n"], max_gen_toks=8, do_sample=True, temperature=1.0, top_k=50)
    torch.manual_seed(1)
    assert run(prompts, until=["\n"], max_gen_toks=8, do_sample=True, temperature=1.0, top_k=50) == sampled
    assert sampled != free
    with pytest.raises(ValueError, match="no_such_setting"):
        run(prompts, until=[], no_such_setting=1)


def test_zoo_eval_tasks_prints_the_table_and_writes_results(tiny_gpt2, tiny_tasks, tiny_results, tmp_path, capsys):
    from zoo.cli import main
    folder = tiny_gpt2[0]
    out = tmp_path / "results.json"
    args = ["eval", str(folder), "--tasks", "zoo_mc,zoo_last", "--include-path", str(tiny_tasks),
            "--batch-size", "4", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\|zoo_mc\s*\|", printed) and "acc_norm" in printed
    results = json.loads(out.read_text())
    for task in ("zoo_mc", "zoo_last"):  # the numbers simple_evaluate(model="zoo") gave at batch size 8
        for metric in ("acc,none", "acc_norm,none", "perplexity,none"):
            if metric in tiny_results[0]["results"][task]:
                assert results["results"][task][metric] == pytest.approx(tiny_results[0]["results"][task][metric],
                                                                          rel=1e-6), (task, metric)
    assert main(args) == 2  # the results file exists: not overwritten
    assert "exists" in capsys.readouterr().err


def test_zoo_eval_looks_for_a_task_outside_the_include_path_among_the_harness_own(tiny_gpt2, tiny_tasks, monkeypatch,
                                                                                   capsys):
    """A task the include path lacks is looked for among the harness's own tasks before it is called unknown.
    (Their index, ~15,000 files, takes lm-eval ~10 s to build: a stand-in holds one of them here.)"""
    import lm_eval.tasks
    from zoo.cli import main
    real, built = lm_eval.tasks.TaskManager, []

    class Manager(real):
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            built.append(include_defaults)
            super().__init__(include_path=include_path, include_defaults=False, **kwargs)
            if include_defaults:
                self._all_tasks = [*self._all_tasks, "hellaswag"]
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    assert main(["eval", str(tiny_gpt2[0]), "--tasks", "zoo_mc,no_such_task_zz",
                 "--include-path", str(tiny_tasks)]) == 2
    assert built == [False, True]  # the include path alone, then with the harness's own tasks
    err = capsys.readouterr().err
    assert "unknown task(s): no_such_task_zz;" in err and "zoo_mc" not in err.split("unknown")[1]


def test_zoo_eval_tasks_without_lm_eval_says_how_to_install(tiny_gpt2, monkeypatch, capsys):
    import sys

    from zoo.cli import main
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.") or m == "zoo.harness"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(zoo, "harness", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails, as when it is not installed
    assert main(["eval", str(tiny_gpt2[0]), "--tasks", "hellaswag"]) == 2
    assert "pip install 'zoo-lm[eval]'" in capsys.readouterr().err
    assert main(["eval", str(tiny_gpt2[0])]) == 2  # neither --data nor --tasks
    assert "--tasks" in capsys.readouterr().err
