"""The eval kind and the lm-eval adapter on tiny models made here.

The constant model prefers " yes" after any input, so on the toyfacts questions (5 of 8
answered "yes") both the multiple-choice accuracy and the generated answer's exact match
are exactly 5/8.
"""

import json
from pathlib import Path

import pydantic
import pytest
from helpers import (
    TOYFACTS,
    expected_yes_accuracy,
    make_constant_model,
    make_random_model,
    write_toyfacts_task,
    write_toygen_task,
)

from tunemake.kinds import evaluate
from tunemake.step import StepContext


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    make_constant_model(root / "model")
    write_toyfacts_task(root / "tasks")
    write_toygen_task(root / "tasks")
    return root


def run_eval(project: Path, out_name: str, **params) -> Path:
    out = project / out_name
    out.mkdir()
    evaluate.run(evaluate.Params(model="model", **params), StepContext(target=out_name, out=out, project_dir=project))
    return out


def test_constant_model_scores_exactly_the_share_of_yes_answers(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data files must resolve against the task YAML, not the working directory
    out = run_eval(project, "both", tasks=["tasks"], log_samples=True, batch_size=3)

    results = json.loads((out / "results.json").read_text())
    assert results["results"]["toyfacts"]["acc,none"] == expected_yes_accuracy() == 0.625
    assert results["results"]["toygen"]["exact_match,first_word"] == 0.625
    # the recorded configs show what the user wrote, not the staged copies
    config = results["configs"]["toyfacts"]
    assert config["metadata"]["config_source"] == "tasks/toyfacts.yaml"  # as the tunefile names it
    assert config["dataset_kwargs"] == {"data_files": {"test": "data/toyfacts.jsonl"}}
    assert "date" not in results and "total_evaluation_time_seconds" not in results

    choices = [json.loads(line) for line in (out / "samples" / "toyfacts.jsonl").read_text().splitlines()]
    assert len(choices) == 8
    for sample in choices:
        (yes, yes_greedy), (no, no_greedy) = sample["filtered_resps"]
        assert yes > no + 10 and yes_greedy and not no_greedy
    generations = [json.loads(line) for line in (out / "samples" / "toygen.jsonl").read_text().splitlines()]
    assert {g["resps"][0][0] for g in generations} == {" yes yes yes"}

    checkpoint = json.loads((out / "checkpoint.json").read_text())
    size = (project / "model" / "model.safetensors").stat().st_size
    assert checkpoint == {"model": "model", "weight_files": {"model.safetensors": size}, "weight_bytes": size,
                          "quantization": None}
    report = (out / "report.md").read_text()
    assert "| toyfacts | acc | none | 0 | 8 | 0.6250 | 0.1830 |" in report
    assert "| toygen | exact_match | first_word | 0 | 8 | 0.6250 | 0.1830 |" in report
    assert evaluate.summary(out) == report


def test_same_params_give_identical_output_bytes(project):
    first = run_eval(project, "first", tasks=["tasks/toyfacts.yaml"], limit=6, log_samples=True)
    again = run_eval(project, "again", tasks=["tasks/toyfacts.yaml"], limit=6, log_samples=True)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["checkpoint.json", "report.md", "results.json", "samples/toyfacts.jsonl"]
    for name in files:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    yes_among_first_six = sum(answer == 0 for _, answer in TOYFACTS[:6]) / 6
    assert json.loads((first / "results.json").read_text())["results"]["toyfacts"]["acc,none"] == yes_among_first_six


def test_perplexity_task_scores_every_token_once_across_windows(project):
    """After any input the constant model gives one fixed distribution, so a document's rolling
    loglikelihood is the sum of that distribution's log-probs over its tokens, whatever the windows."""
    import torch

    from tunemake.models import load_model, load_tokenizer

    documents = ["the cat is red and the dog is green " * k for k in (1, 3, 6)]  # up to 4 windows of 16
    (project / "rolling").mkdir()
    (project / "rolling" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (project / "rolling" / "rolling.yaml").write_text(
        "task: rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    out = run_eval(project, "rolling_out", tasks=["rolling/rolling.yaml"], max_seq_length=16, log_samples=True)

    model, tokenizer = load_model(project / "model"), load_tokenizer(project / "model")
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([[5, 6, 7]]))[0, -1].float(), dim=-1)
    assert len(tokenizer.encode(documents[-1])) > 3 * 16
    samples = [json.loads(line) for line in (out / "samples" / "rolling.jsonl").read_text().splitlines()]
    for sample, document in zip(sorted(samples, key=lambda s: s["doc_id"]), documents):
        expected = sum(log_probs[t].item() for t in tokenizer.encode(document))  # BOS included, as lm-eval does
        assert sample["filtered_resps"][0] == pytest.approx(expected, rel=1e-4)


def test_chat_template_wraps_each_question(project):
    out = run_eval(project, "chat", tasks=["tasks/toyfacts.yaml"], apply_chat_template=True, limit=2, log_samples=True)
    sample = json.loads((out / "samples" / "toyfacts.jsonl").read_text().splitlines()[0])
    # lm-eval drops the target delimiter after a chat prompt
    assert sample["prompt"] == "<s><|user|> Is fire hot? Answer:</s><|assistant|>"
    assert sample["continuations"] == ["yes", "no"]


def test_adapter_agrees_with_lm_eval_hf_model(tmp_path):
    """Loglikelihood (batched, deduplicated, truncated), rolling windows and generate_until vs HFLM."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunemake.lmeval_adapter import NativeLM
    from tunemake.models import load_model, load_tokenizer

    folder = make_random_model(tmp_path / "model")
    ours = NativeLM(load_model(folder), load_tokenizer(folder), batch_size=3, max_length=24, max_gen_toks=6)
    reference = HFLM(
        pretrained=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        batch_size=2,
        max_length=24,
        max_gen_toks=6,
    )

    generation = [
        Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 6, "do_sample": False}), i)
        for i, (context, until) in enumerate(
            [("the cat is", ["\n"]), ("Is fire hot? Answer:", [" "]), ("a b", ["e", "?"]), ("yes", ["\n"])]
        )
    ]
    generated = ours.generate_until(generation)
    assert generated == reference.generate_until(generation)
    assert any(text for text in generated)

    pairs = [
        ("Is fire hot? Answer:", " yes"),
        ("Is fire hot? Answer:", " no"),
        ("", "the cat is red"),  # empty context: scored after the BOS
        ("a b ", "big dog"),  # trailing space moves to the continuation
        ("Is the sky blue and the grass green and the snow white? Answer:", " yes it is"),  # truncated
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours_ll, reference_ll = ours.loglikelihood(requests), reference.loglikelihood(requests)
    assert [greedy for _, greedy in ours_ll] == [greedy for _, greedy in reference_ll]
    assert [lp for lp, _ in ours_ll] == pytest.approx([lp for lp, _ in reference_ll], abs=1e-4)

    documents = ["the cat is red and the dog is green " * 4, "yes"]  # the first spans several windows
    rolling = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(documents)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(reference.loglikelihood_rolling(rolling), abs=1e-3)


def test_task_files_and_includes_resolve_against_their_own_folders(tmp_path, monkeypatch):
    """A task in a subfolder includes a base YAML whose data file is relative to the base's folder."""
    tasks = tmp_path / "tasks"
    write_toyfacts_task(tasks)
    base = (tasks / "toyfacts.yaml").read_text().replace("task: toyfacts\n", "")
    (tasks / "_base.yaml").write_text(base)
    (tasks / "sub").mkdir()
    (tasks / "sub" / "utils.py").write_text("def keep(dataset):\n    return dataset\n")
    (tasks / "sub" / "child.yaml").write_text("include: ../_base.yaml\ntask: child\nprocess_docs: !function utils.keep\n")
    monkeypatch.chdir(tmp_path / "tasks" / "sub")

    files = evaluate.code_files(evaluate.Params(model="m", tasks=["tasks/sub/child.yaml", "hellaswag"]), tmp_path)
    assert files == sorted(str(p) for p in (tasks / "_base.yaml", tasks / "data" / "toyfacts.jsonl",
                                             tasks / "sub" / "child.yaml", tasks / "sub" / "utils.py"))

    import tempfile

    with tempfile.TemporaryDirectory() as staging:
        names, manager, _ = evaluate.resolve_tasks(["tasks/sub/child.yaml"], tmp_path, Path(staging))
        assert names == ["child"]
        task = manager.load(names)["tasks"]["child"]
        assert [doc["question"] for doc in task.test_docs()][:2] == ["Is fire hot?", "Is ice hot?"]


def test_bad_params_fail_early_with_the_field_named(project, tmp_path):
    with pytest.raises(pydantic.ValidationError, match="limit: a fraction of the documents must be below 1"):
        evaluate.Params(model="m", tasks=["t"], limit=1.5)
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        evaluate.Params(model="m", tasks=["t"], dtype="int8")
    with pytest.raises(pydantic.ValidationError, match="tasks"):
        evaluate.Params(model="m", tasks=[])
    with pytest.raises(pydantic.ValidationError, match="extra"):
        evaluate.Params(model="m", tasks=["t"], fewshot=3)

    def check(message, **params):
        with pytest.raises(ValueError, match=message):
            evaluate.validate(evaluate.Params(**{"model": "model", "tasks": ["tasks"], **params}), project)

    check("tasks: tasks/missing.yaml does not exist", tasks=["tasks/missing.yaml"])
    check("tasks: tasks/data/toyfacts.jsonl is not a YAML task file", tasks=["tasks/data/toyfacts.jsonl"])
    check("tasks: folder tasks/data holds no .yaml task files", tasks=["tasks/data"])
    (project / "empty_model").mkdir(exist_ok=True)
    check("model: .*empty_model has no config.json", model="empty_model")
    evaluate.validate(evaluate.Params(model="model", tasks=["tasks", "arc_easy"]), project)  # names: checked later

    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cuda requested but torch sees no CUDA device"):
            evaluate.check_device("cuda", None)

    # a broken checkpoint proves the task is checked before any weight is read
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "bad.yaml").write_text(
        (project / "tasks" / "toyfacts.yaml").read_text().replace("data/toyfacts.jsonl", "data/gone.jsonl")
    )
    ctx = StepContext(target="e", out=tmp_path, project_dir=tmp_path)
    with pytest.raises(ValueError, match=r"tasks: .*bad.yaml names data file 'data/gone.jsonl'"):
        evaluate.run(evaluate.Params(model="broken", tasks=["tasks/bad.yaml"]), ctx)
    with pytest.raises(ValueError, match="tasks: unknown lm-eval task 'no_such_task_xyz'"):
        evaluate.run(evaluate.Params(model="broken", tasks=["no_such_task_xyz"]), ctx)


GEMMA = {"gemma_norms": True, "activation": "gelu_tanh", "sandwich_norms": True, "query_pre_attn_scalar": 20,
         "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}
GEMMA2 = {**GEMMA, "model_type": "gemma2", "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5}
GEMMA3 = {**GEMMA, "model_type": "gemma3_text", "qk_norm": True, "local_rope_theta": 10000.0, "rope_theta": 1e6,
          "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
# LongRoPE switching to its long factors past 16 tokens: the context (11) plus the short continuations
# stays before the switch, the longest ones go past it, so a packed pass must not mix them
PHI4_MINI = {"model_type": "phi3", "fused_projections": True, "partial_rotary_factor": 0.75, "rope_scaling": {
    "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0], "long_factor": [1.5, 2, 3.5, 5, 8, 12],
    "original_max_position_embeddings": 16, "factor": 4.0, "attention_factor": 1.2247}}


@pytest.mark.parametrize("overrides", [
    {}, {"sliding_window": 5, "model_type": "mistral"}, {"qk_norm": True, "model_type": "qwen3"},
    {"gemma_norms": True, "activation": "gelu_tanh", "model_type": "gemma"},
    GEMMA2, GEMMA3, PHI4_MINI,
], ids=["llama", "mistral_window", "qwen3", "gemma", "gemma2", "gemma3", "phi4_mini_longrope"])
def test_shared_prefix_scores_equal_full_recomputation(tmp_path, overrides):
    """One packed forward per context gives each continuation the log-likelihood (and greedy flag)
    that running context + continuation alone gives, to fp32 rounding; windows shorter than the
    sequence included."""
    import torch

    from tunemake.lmeval_adapter import NativeLM
    from tunemake.models import load_model, load_tokenizer

    folder = make_random_model(tmp_path / "model", **overrides)
    model = load_model(folder)
    lm = NativeLM(model, load_tokenizer(folder), max_length=64)
    torch.manual_seed(1)
    context = tuple(torch.randint(3, model.args.vocab_size, (11,)).tolist())
    continuations = sorted({tuple(torch.randint(3, model.args.vocab_size, (n,)).tolist()) for n in (1, 1, 2, 4, 7, 9)})
    passes = []
    score = lm._score_unit
    lm._score_unit = lambda ctx, conts: passes.append(len(conts)) or score(ctx, conts)
    packed = lm._loglikelihood_tokens([(None, list(context), list(c)) for c in continuations])
    assert max(passes) > 1  # continuations really were packed into one pass
    worst = 0.0
    with torch.no_grad():
        for continuation, (log_prob, greedy) in zip(continuations, packed):
            tokens = torch.tensor([list(context + continuation)[:-1]])
            log_probs = torch.log_softmax(model(tokens)[0, -len(continuation):].float(), dim=-1)
            target = torch.tensor(continuation)
            expected = log_probs.gather(1, target.unsqueeze(1)).sum().item()
            worst = max(worst, abs(log_prob - expected))
            assert greedy == bool((log_probs.argmax(-1) == target).all())
    assert worst <= 1e-4
    # the packed unit really packs: a sequence longer than the window when windows are set
    assert len(context) + sum(len(c) - 1 for c in continuations) > overrides.get("sliding_window", 0)


def test_metrics_and_samples_are_identical_across_batch_sizes(tmp_path):
    """Loglikelihood units never share a forward pass, so batch_size cannot change them; generation
    batches can differ in the last bits of a logit (the kernels' reduction order follows the batch),
    which this tiny model's greedy texts do not feel: the bound is checked on the logits below."""
    import torch

    from tunemake.models import load_model
    from tunemake.models.generation import generate

    root = tmp_path / "project"
    make_random_model(root / "model")
    write_toyfacts_task(root / "tasks")
    write_toygen_task(root / "tasks")
    outputs = {}
    for batch_size in (1, 8, 32):
        out = run_eval(root, f"b{batch_size}", tasks=["tasks"], batch_size=batch_size)
        results = json.loads((out / "results.json").read_text())
        outputs[batch_size] = (results["results"], [(out / "samples" / f"{t}.jsonl").read_bytes() for t in ("toyfacts", "toygen")])
    assert outputs[1] == outputs[8] == outputs[32]

    model = load_model(root / "model")
    prompts = [[0] + list(range(5, 5 + n)) for n in (3, 9, 4, 12, 7, 5, 10, 6)]
    with torch.no_grad():
        alone = [model(torch.tensor([p]))[0, -1] for p in prompts]
        batch = []
        model.setup_cache(len(prompts), 16)
        width = max(map(len, prompts))
        padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        left_pad = torch.tensor([width - len(p) for p in prompts])
        batch = model(padded, input_pos=torch.arange(width), left_pad=left_pad)[:, -1]
        model.clear_cache()
    assert max((a - b).abs().max().item() for a, b in zip(alone, batch)) <= 1e-5
    texts = {n: [c.tokens for c in generate(model, prompts[:n], 6)] for n in (1, 8)}
    assert texts[1] == texts[8][:1]


@pytest.mark.parametrize("overrides", [GEMMA2, GEMMA3], ids=["gemma2", "gemma3"])
def test_gemma_2_and_3_evaluate_and_generate_through_the_kind(tmp_path, overrides):
    """Multiple choice (packed, per-layer windows) and generate_until on the newer families, with
    results that do not depend on the batch size."""
    root = tmp_path / "project"
    make_random_model(root / "model", **overrides)
    write_toyfacts_task(root / "tasks")
    write_toygen_task(root / "tasks")
    first = run_eval(root, "b1", tasks=["tasks"], batch_size=1)
    again = run_eval(root, "b8", tasks=["tasks"], batch_size=8)
    results = json.loads((first / "results.json").read_text())["results"]
    assert 0 <= results["toyfacts"]["acc,none"] <= 1 and "exact_match,first_word" in results["toygen"]
    assert results == json.loads((again / "results.json").read_text())["results"]
    generations = [json.loads(line) for line in (first / "samples" / "toygen.jsonl").read_text().splitlines()]
    assert len(generations) == 8 and all(isinstance(g["filtered_resps"][0], str) for g in generations)


def test_only_the_needed_positions_reach_the_output_projection(tmp_path):
    """A 262k vocabulary (Gemma 3) makes [batch, seq, vocab] fp32 logits gigabytes: scoring sends
    only the positions that predict continuation tokens through the final norm and projection,
    and generation's prefill only each row's last one."""
    import torch

    from tunemake.lmeval_adapter import NativeLM
    from tunemake.models import load_model, load_tokenizer
    from tunemake.models.generation import generate

    folder = make_random_model(tmp_path / "model", tie_word_embeddings=True)
    model = load_model(folder)
    seen = []
    model.model.norm.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    lm = NativeLM(model, load_tokenizer(folder), max_length=64)
    context = tuple(range(5, 45))  # 40 tokens
    lm._score_unit(context, [(50,), (51, 52, 53)])
    assert seen == [(1, 1 + 2, model.args.dim)]  # the context's last position and the 2 fed continuation tokens
    seen.clear()
    generate(model, [list(range(5, 45)), list(range(7, 30))], max_new_tokens=3)
    assert seen[0] == (2, 1, model.args.dim) and all(shape[1] == 1 for shape in seen)
