"""Generation: greedy equal to transformers, padding-independent batches, stops, seeded sampling."""

import pytest
import torch

from tests.models.conftest import ARCHITECTURES, make_hf_model
from tunemake.models import load_model
from tunemake.models.generation import generate

PROMPTS = [[5, 17, 99, 4, 23], [8, 8, 61], [100, 7, 3, 44, 90, 12, 31, 9]]


def hf_greedy(hf_model, prompt, max_new_tokens):
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    output = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", ["llama", "llama3_rope", "mistral_window", "qwen2_tied", "llama_tied_wide_heads", "qwen3_qk_norm", "qwen2_window", "gemma", "gemma2", "gemma3", "phi3", "phi4_mini_longrope"])
def test_greedy_matches_transformers_generate(tmp_path, variant):
    model_type, overrides = ARCHITECTURES[variant]
    hf_model = make_hf_model(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    completion = generate(model, [PROMPTS[0]], max_new_tokens=32)[0]
    assert completion.tokens == hf_greedy(hf_model, PROMPTS[0], 32)
    assert completion.finish_reason == "length" and completion.prompt_tokens == 5
    assert completion.time_to_first_token_s > 0 and completion.decode_tokens_per_s > 0


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    make_hf_model(tmp_path, "qwen2", use_sliding_window=False)
    model = load_model(tmp_path)
    batched = generate(model, PROMPTS, max_new_tokens=20)
    alone = [generate(model, [prompt], max_new_tokens=20)[0] for prompt in PROMPTS]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [c.prompt_tokens for c in batched] == [5, 3, 8]


def test_stop_ids_end_each_row_independently(tmp_path):
    make_hf_model(tmp_path, "llama")
    model = load_model(tmp_path)
    free = generate(model, PROMPTS[:2], max_new_tokens=16)
    stop_token = free[0].tokens[4]
    first_stop = free[0].tokens.index(stop_token)
    stopped = generate(model, PROMPTS[:2], max_new_tokens=16, stop_ids={stop_token})
    assert stopped[0].tokens == free[0].tokens[:first_stop]
    assert (stopped[0].finish_reason, stopped[0].stop_token) == ("stop", stop_token)
    if stop_token in free[1].tokens:
        assert stopped[1].tokens == free[1].tokens[: free[1].tokens.index(stop_token)]
    else:
        assert stopped[1].tokens == free[1].tokens and stopped[1].finish_reason == "length"


def test_sampling_is_seeded(tmp_path):
    make_hf_model(tmp_path, "llama")
    model = load_model(tmp_path)

    def run(seed, **kwargs):
        return [c.tokens for c in generate(model, PROMPTS, max_new_tokens=12, temperature=1.5, seed=seed, **kwargs)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7, top_k=5, top_p=0.9) == run(7, top_k=5, top_p=0.9)
    greedy = [c.tokens for c in generate(model, PROMPTS, max_new_tokens=12)]
    assert run(3, top_k=1) == greedy


def test_sampled_tokens_stay_in_top_k(tmp_path):
    """Every sampled token is among the top_k of the logits the model gave for that step."""
    make_hf_model(tmp_path, "llama")
    model = load_model(tmp_path)
    prompt = PROMPTS[2]
    tokens = generate(model, [prompt], max_new_tokens=10, temperature=2.0, top_k=3, seed=1)[0].tokens
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(token in row.tolist() for token, row in zip(tokens, top3))


def test_bad_requests_are_clear_errors(tmp_path):
    make_hf_model(tmp_path, "llama")
    model = load_model(tmp_path)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 128\)"):
        generate(model, [[1, 128]], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [[1]], max_new_tokens=4, temperature=1.0, top_p=0)


def test_compiled_decode_matches_eager(tmp_path, monkeypatch):
    """The decode step traces as one graph (fullgraph=True) and computes the same tokens.

    aot_eager checks our side (capture, in-place cache writes) in seconds; inductor's code
    generation, which takes ~30 s here, is exercised by the compiled rows of bench/bench_models.py.
    """
    import tunemake.models.generation as generation

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="aot_eager", **kwargs))
    monkeypatch.setattr(generation, "_compiled_decode_step", None)
    make_hf_model(tmp_path, "llama", num_hidden_layers=1)
    model = load_model(tmp_path)
    eager = [c.tokens for c in generate(model, PROMPTS[:2], max_new_tokens=8)]
    compiled = [c.tokens for c in generate(model, PROMPTS[:2], max_new_tokens=8, compile=True)]
    assert compiled == eager
