"""kind = "generate": sample completions from a checkpoint, and measure how fast.

Outputs: samples.jsonl (one record per prompt: prompt, completion, token ids, finish
reason, params), samples.md for reading, and speed.json (decode tokens/s, time to first
token, peak memory). The same params and seed give byte-identical samples.jsonl and
samples.md on the same device; speed.json is a measurement and varies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INPUTS = ("model",)
OPTIONAL_INPUTS = ("prompts_file",)
PACKAGES = ("python", "torch", "torchao")
CODE = ("tunemake.models", "tunemake.kinds.model_inputs")
DEVICE_SENSITIVE = True


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a target or a path giving a checkpoint folder")
    prompt: str | None = None
    prompts: list[str] | None = None
    prompts_file: str | None = Field(
        default=None, description=".txt: one prompt per line; .jsonl: one {\"prompt\": ...} per line"
    )
    chat: bool = Field(default=False, description="wrap each prompt as a user message in the chat template")
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int = 0
    batch_size: int = Field(default=8, ge=1, description="prompts decoded together")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(default=None, description="default: the checkpoint's")
    compile: bool = False

    @model_validator(mode="after")
    def _one_prompt_source(self):
        given = [name for name in ("prompt", "prompts", "prompts_file") if getattr(self, name) is not None]
        if len(given) != 1:
            found = " and ".join(given) if given else "none"
            raise ValueError(f"prompt: give exactly one of prompt, prompts, prompts_file (got {found})")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts: empty list")
        if self.prompts_file is not None and not self.prompts_file.endswith((".txt", ".jsonl")):
            raise ValueError(f"prompts_file: expected a .txt or .jsonl file, got {self.prompts_file}")
        return self


def resources(params: Params) -> dict:
    return {"gpus": 1} if params.device == "cuda" else {}


def validate(params: Params, project_dir) -> None:
    from tunemake.kinds.model_inputs import check_model_folder

    check_model_folder(Path(project_dir) / params.model)
    if params.prompts_file is not None:
        path = Path(project_dir) / params.prompts_file
        if path.exists():
            read_prompts_file(path)


def read_prompts_file(path: Path) -> list[str]:
    """Prompts of a .txt (one per non-empty line) or .jsonl ({"prompt": str} per line) file."""
    if not path.is_file():
        raise ValueError(f"prompts_file: {path} is not a file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"prompts_file: {path}:{number}: invalid JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'prompts_file: {path}:{number}: expected {{"prompt": "..."}}')
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"prompts_file: {path} holds no prompts")
    return prompts


def summary(out_dir) -> str:
    speed = json.loads((Path(out_dir) / "speed.json").read_text())
    decode = speed["decode_tokens_per_s"]
    return (
        f"{speed['prompts']} prompts, {speed['new_tokens']} new tokens; "
        f"decode {'n/a' if decode is None else f'{decode:.1f}'} tokens/s per sequence, "
        f"first token {speed['time_to_first_token_s'] * 1e3:.1f} ms, "
        f"peak memory {speed['peak_memory_bytes'] / 1e6:.0f} MB ({speed['device']}, {speed['dtype']})"
    )


def run(params: Params, ctx) -> None:
    started = time.time()
    if params.prompts_file is not None:
        prompts = read_prompts_file(Path(ctx.project_dir) / params.prompts_file)
    else:
        prompts = [params.prompt] if params.prompt is not None else list(params.prompts)
    model_folder = Path(ctx.project_dir) / params.model

    import torch

    from tunemake.kinds.model_inputs import check_device, check_model_folder, dependency_name
    from tunemake.models import load_model, load_tokenizer
    from tunemake.models.generation import generate

    check_model_folder(model_folder)
    device = check_device(params.device, params.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_model(model_folder, device=device, dtype=getattr(torch, params.dtype) if params.dtype else None)
    tokenizer = load_tokenizer(model_folder)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) if params.chat else p
        for p in prompts
    ]
    prompt_tokens = [encode_prompt(tokenizer, text, params.chat) for text in texts]
    # an untimed run of the first batch's shape keeps one-time costs (kernel selection, allocator
    # growth, torch.compile) out of speed.json; samples come only from the timed runs below
    generate(model, prompt_tokens[: params.batch_size], params.max_new_tokens, compile=params.compile)
    loaded = time.time()

    completions, batches = [], []
    for start in range(0, len(prompt_tokens), params.batch_size):
        batch = generate(
            model,
            prompt_tokens[start : start + params.batch_size],
            params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            stop_ids=tokenizer.eos_ids,
            seed=params.seed + start,  # each batch its own stream; the same for every run
            compile=params.compile,
        )
        completions += batch
        batches.append(
            {
                "prompts": len(batch),
                "time_to_first_token_s": batch[0].time_to_first_token_s,
                "decode_tokens_per_s": batch[0].decode_tokens_per_s,
            }
        )
        ctx.progress(len(completions), len(prompt_tokens), "prompts")
    finished = time.time()

    recorded_params = params.model_dump(exclude={"model", "prompt", "prompts", "prompts_file"})
    records = []
    for index, (prompt, text, tokens, completion) in enumerate(zip(prompts, texts, prompt_tokens, completions)):
        records.append(
            {
                "index": index,
                "prompt": prompt,
                "prompt_text": text,
                "prompt_tokens": tokens,
                "completion": tokenizer.decode(completion.tokens),
                "tokens": completion.tokens,
                "finish_reason": completion.finish_reason,
                "stop_token": completion.stop_token,
                "params": recorded_params,
            }
        )
    out = Path(ctx.out)
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "samples.md").write_text(markdown_samples(records, dependency_name(ctx, model_folder)), encoding="utf-8")
    speed = speed_record(completions, batches, params, device, dependency_name(ctx, model_folder))
    speed.update(
        load_and_warmup_seconds=round(loaded - started, 3),
        generate_seconds=round(finished - loaded, 3),
        throughput_tokens_per_s=speed["new_tokens"] / (finished - loaded),
    )
    (out / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    print(summary(out), flush=True)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    # a chat template usually writes the BOS itself
    bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
    add_bos = not (chat and bos_text and text.startswith(bos_text))
    return tokenizer.encode(text, add_bos=add_bos)


def speed_record(completions, batches: list[dict], params: Params, device, model_name: str) -> dict:
    """Per-sequence decode speed and time to first token, averaged over the batches."""
    import resource

    import torch

    new_tokens = sum(len(c.tokens) + (c.stop_token is not None) for c in completions)
    decoding = [b["decode_tokens_per_s"] for b in batches if b["decode_tokens_per_s"] > 0]  # 0: one token only
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "model": model_name,
        "prompts": len(completions),
        "new_tokens": new_tokens,
        "decode_tokens_per_s": sum(decoding) / len(decoding) if decoding else None,
        "time_to_first_token_s": sum(b["time_to_first_token_s"] for b in batches) / len(batches),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "device": device.type,
        "dtype": params.dtype or "as stored",
        "compile": params.compile,
        "batch_size": params.batch_size,
        "batches": batches,
    }


def markdown_samples(records: list[dict], model_name: str) -> str:
    lines = [f"# samples from {model_name}", ""]
    for record in records:
        lines += [f"## {record['index']} ({record['finish_reason']}, {len(record['tokens'])} tokens)", ""]
        for title, text in (("prompt", record["prompt_text"]), ("completion", record["completion"])):
            fence = "`" * max(3, longest_backtick_run(text) + 1)  # a fence the text cannot close
            lines += [f"**{title}**", "", fence + "text", text, fence, ""]
    return "\n".join(lines)


def longest_backtick_run(text: str) -> int:
    import re

    return max((len(run) for run in re.findall("`+", text)), default=0)
