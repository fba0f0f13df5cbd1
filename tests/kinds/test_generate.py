"""The generate kind on tiny models made here: reproducible samples, stop tokens, chat, prompt sources."""

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from helpers import make_constant_model, make_random_model, token_id

from tunemake.kinds import generate
from tunemake.models import load_tokenizer
from tunemake.step import StepContext

PROMPTS = ["the cat is", "Is fire hot? Answer:", "a"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("project") / "model")


def run_generate(model: Path, out_name: str, **params) -> Path:
    project = model.parent
    out = project / out_name
    out.mkdir()
    ctx = StepContext(target=out_name, out=out, project_dir=project)
    generate.run(generate.Params(model=model.name, **params), ctx)
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_samples(random_model):
    sampled = dict(prompts=PROMPTS, max_new_tokens=12, temperature=1.0, top_k=50, batch_size=2)
    first = run_generate(random_model, "first", seed=7, **sampled)
    again = run_generate(random_model, "again", seed=7, **sampled)
    other = run_generate(random_model, "other", seed=8, **sampled)
    assert (first / "samples.jsonl").read_bytes() == (again / "samples.jsonl").read_bytes()
    assert (first / "samples.md").read_bytes() == (again / "samples.md").read_bytes()
    assert [r["tokens"] for r in records(first)] != [r["tokens"] for r in records(other)]

    tokenizer = load_tokenizer(random_model)
    for prompt, record in zip(PROMPTS, records(first)):
        assert record["prompt"] == prompt
        assert record["prompt_tokens"] == tokenizer.encode(prompt)
        assert record["completion"] == tokenizer.decode(record["tokens"])
        assert record["params"]["seed"] == 7 and record["params"]["temperature"] == 1.0
        assert record["finish_reason"] in ("stop", "length")
        assert len(record["tokens"]) == 12 or record["finish_reason"] == "stop"


def test_greedy_output_of_a_constant_model_and_speed_record(tmp_path):
    model = make_constant_model(tmp_path / "model", favourite=" yes")
    out = run_generate(model, "out", prompts=PROMPTS, max_new_tokens=5, batch_size=2)
    yes = token_id(model, " yes")
    for record in records(out):
        assert record["tokens"] == [yes] * 5
        assert record["completion"] == " yes" * 5
        assert record["finish_reason"] == "length" and record["stop_token"] is None

    speed = json.loads((out / "speed.json").read_text())
    assert speed["model"] == "model" and speed["prompts"] == 3 and speed["new_tokens"] == 15
    assert [b["prompts"] for b in speed["batches"]] == [2, 1]
    assert speed["decode_tokens_per_s"] > 0 and speed["time_to_first_token_s"] > 0
    assert speed["peak_memory_bytes"] > 0
    assert "3 prompts, 15 new tokens" in generate.summary(out)
    assert "```text\n" in (out / "samples.md").read_text()


def test_end_of_sequence_stops_generation(tmp_path):
    model = make_constant_model(tmp_path / "model", favourite="</s>")
    out = run_generate(model, "out", prompt="the cat is", max_new_tokens=5)
    (record,) = records(out)
    assert record["tokens"] == [] and record["completion"] == ""
    assert record["finish_reason"] == "stop" and record["stop_token"] == token_id(model, "</s>")


def test_chat_template_and_prompt_files(random_model):
    tokenizer = load_tokenizer(random_model)
    out = run_generate(random_model, "chat", prompt="Is fire hot?", chat=True, max_new_tokens=2)
    (record,) = records(out)
    assert record["prompt_text"] == "<s><|user|> Is fire hot?</s><|assistant|>"
    assert record["prompt_tokens"] == tokenizer.encode(record["prompt_text"], add_bos=False)
    assert record["prompt_tokens"].count(tokenizer.bos_id) == 1

    (random_model.parent / "prompts.txt").write_text("the cat is\n\nIs fire hot?\n")
    (random_model.parent / "prompts.jsonl").write_text('{"prompt": "the cat is"}\n{"prompt": "Is fire hot?"}\n')
    from_txt = run_generate(random_model, "txt", prompts_file="prompts.txt", max_new_tokens=3)
    from_jsonl = run_generate(random_model, "jsonl", prompts_file="prompts.jsonl", max_new_tokens=3)
    from_list = run_generate(random_model, "list", prompts=["the cat is", "Is fire hot?"], max_new_tokens=3)
    assert [r["tokens"] for r in records(from_txt)] == [r["tokens"] for r in records(from_list)]
    assert [r["tokens"] for r in records(from_jsonl)] == [r["tokens"] for r in records(from_list)]


def test_bad_params_fail_before_a_model_is_loaded(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="prompt: give exactly one of prompt, prompts, prompts_file"):
        generate.Params(model="m", prompt="a", prompts=["b"])
    with pytest.raises(pydantic.ValidationError, match=r"prompt: .*\(got none\)"):
        generate.Params(model="m")
    with pytest.raises(pydantic.ValidationError, match="prompts: empty list"):
        generate.Params(model="m", prompts=[])
    with pytest.raises(pydantic.ValidationError, match="prompts_file: expected a .txt or .jsonl file"):
        generate.Params(model="m", prompts_file="p.csv")
    with pytest.raises(pydantic.ValidationError, match="top_p"):
        generate.Params(model="m", prompt="a", top_p=1.5)

    (tmp_path / "no_config").mkdir()
    with pytest.raises(ValueError, match="model: .*no_config has no config.json"):
        generate.validate(generate.Params(model="no_config", prompt="a"), tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r'prompts_file: .*bad.jsonl:2: expected \{"prompt": "..."\}'):
        generate.validate(generate.Params(model="m", prompts_file="bad.jsonl"), tmp_path)


def test_kind_modules_import_neither_torch_nor_lm_eval_nor_matplotlib():
    code = (
        "import sys\n"
        "from tunemake.kinds import evaluate, generate, report\n"
        "evaluate.Params(model='m', tasks=['x']); generate.Params(model='m', prompt='a'); report.Params(evals=['e'])\n"
        "print(sorted(m for m in ('torch', 'lm_eval', 'transformers', 'datasets', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
