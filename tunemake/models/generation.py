"""Batched generation with a static KV cache: left-padded prefill, then one token per step.

The cache is sized to the request (longest prompt + max_new_tokens), not to the model's
context length. With compile=True the decode step goes through torch.compile (gpt-fast style).
"""

import time
from dataclasses import dataclass

import torch

from tunemake.models.llama import Transformer
from tunemake.models.sampling import check_sampling_params, sample_next_tokens


@dataclass
class Completion:
    tokens: list[int]  # generated ids, prompt and stop token excluded
    finish_reason: str  # "stop" (a stop id was produced) or "length" (max_new_tokens reached)
    stop_token: int | None
    prompt_tokens: int
    time_to_first_token_s: float  # prefill + first sample, shared by the whole batch
    decode_tokens_per_s: float  # decode steps per second for each sequence of the batch


def decode_step(model: Transformer, tokens, input_pos, left_pad) -> torch.Tensor:
    return model(tokens, input_pos=input_pos, left_pad=left_pad)[:, -1]


_compiled_decode_step = None
COMPILED_CACHE_MULTIPLE = 128


def _decode_function(compile: bool):
    global _compiled_decode_step
    if not compile:
        return decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _compiled_decode_step


def _longrope_restart(model: Transformer) -> int | None:
    """The cache slot at which a LongRoPE model's generation recomputes its cache, else None."""
    scaling = model.args.rope_scaling or {}
    return scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: set[int] = frozenset(),
    seed: int = 0,
    compile: bool = False,
) -> list[Completion]:
    """Completions of token-id prompts; same seed on the same device gives the same tokens."""
    check_sampling_params(temperature, top_k, top_p)
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab_size = model.args.vocab_size
    for i, prompt in enumerate(prompts):
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")

    device = model.model.embed_tokens.weight.device
    batch = len(prompts)
    width = max(len(prompt) for prompt in prompts)
    left_pad = torch.tensor([width - len(prompt) for prompt in prompts], device=device)
    tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    step = _decode_function(compile)

    cache_len = width + max_new_tokens
    if compile:  # fewer distinct cache shapes, fewer recompilations
        cache_len = -(-cache_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    model.setup_cache(batch, cache_len)
    try:
        started = time.perf_counter()
        logits = model(tokens, input_pos=torch.arange(width, device=device), left_pad=left_pad, last_logits_only=True)
        next_tokens = sample_next_tokens(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        _synchronize(device)
        time_to_first_token = time.perf_counter() - started

        generated = [next_tokens]
        finished = torch.isin(next_tokens, stop)
        decode_started = time.perf_counter()
        restart = _longrope_restart(model)
        for position in range(width, width + max_new_tokens - 1):
            if bool(finished.all()):
                break
            if position == restart:
                # as transformers' Phi-3 generate: once the sequence passes LongRoPE's original context,
                # run it all again, so every cached key is turned by the long factors
                so_far = torch.cat([tokens, torch.stack(generated, dim=1)], dim=1)
                logits = model(so_far, input_pos=torch.arange(position + 1, device=device), left_pad=left_pad,
                               last_logits_only=True)[:, -1]
            else:
                input_pos = torch.tensor([position], device=device)
                logits = step(model, next_tokens.unsqueeze(1), input_pos, left_pad)
            next_tokens = sample_next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            generated.append(next_tokens)
            finished |= torch.isin(next_tokens, stop)
        _synchronize(device)
        decode_seconds = time.perf_counter() - decode_started
    finally:
        if not compile:  # a compiled step keeps its cache for the next call of the same shape
            model.clear_cache()

    decode_steps = len(generated) - 1
    decode_rate = decode_steps / decode_seconds if decode_steps else 0.0
    rows = torch.stack(generated, dim=1).tolist()
    completions = []
    for prompt, row in zip(prompts, rows):
        stop_at = next((i for i, token in enumerate(row) if token in stop_ids), None)
        completions.append(
            Completion(
                tokens=row if stop_at is None else row[:stop_at],
                finish_reason="length" if stop_at is None else "stop",
                stop_token=None if stop_at is None else row[stop_at],
                prompt_tokens=len(prompt),
                time_to_first_token_s=time_to_first_token,
                decode_tokens_per_s=decode_rate,
            )
        )
    return completions
