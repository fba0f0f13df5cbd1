"""lm-evaluation-harness over the native model: a TemplateLM that `lm_eval.simple_evaluate` drives.

Imported only inside the eval step's child process (it imports torch and lm_eval).

Loglikelihood requests are deduplicated (multiple-choice answers of one token share
the same input), sorted longest first and run in right-padded batches; causal attention
means padding after a row's last token never changes that row's logits, so no mask is
needed. Only the positions that score continuation tokens go through the final norm and
the output projection: with a 49k vocabulary (a 135M model) that projection is a fifth
of the model's work per position, and the log-softmax over it dominates memory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

Progress = Callable[[int, int, str], None]


class NativeLM(TemplateLM):
    """Scores and generates with a `tunemake.models.Transformer` and its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        name: str = "native",
        progress: Progress | None = None,
    ):
        super().__init__()
        self.model = model
        # lm-eval reads `.tokenizer.chat_template` only through chat_template(), which we override
        self.native_tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.args.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self.name = name
        self.report_progress = progress or (lambda done, total, message: None)
        self._device = next(model.parameters()).device
        self._bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
        self._eot_id = _main_eos_id(tokenizer)
        self._stop_token_cache: dict[tuple[str, ...], set[int]] = {}

    # ---- tokenization -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.native_tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # like lm-eval's HF model: BOS by default, but not twice when a chat template already wrote it
        if add_special_tokens is None:
            add_special_tokens = not (self._bos_text and string.startswith(self._bos_text))
        return self.native_tokenizer.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.native_tokenizer.decode(tokens, skip_special_tokens=True)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.native_tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.native_tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- scoring ------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy choice) per request."""
        # a request scores the last len(continuation) logits of input = (context + continuation)[:-1]
        users: dict[tuple[int, ...], list[int]] = defaultdict(list)  # input -> requests that score it
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("lm-eval sent an empty context or continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            users[tuple((context + continuation)[-(self.max_length + 1) :][:-1])].append(index)

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        unique = sorted(users, key=lambda t: (-len(t), t))
        for start in range(0, len(unique), self.batch_size):
            batch = unique[start : start + self.batch_size]
            counts = [max(len(requests[i][2]) for i in users[tokens]) for tokens in batch]
            for tokens, log_probs in zip(batch, self._score_batch(batch, counts)):
                for index in users[tokens]:
                    request_strings, _, continuation = requests[index]
                    scores = log_probs[-len(continuation) :]  # [len(continuation), vocab]
                    target = torch.tensor(continuation, dtype=torch.long)
                    answer = (float(scores.gather(1, target.unsqueeze(1)).sum()), bool((scores.argmax(-1) == target).all()))
                    results[index] = answer
                    if request_strings is not None:  # rolling windows are cached per document instead
                        self.cache_hook.add_partial("loglikelihood", request_strings, answer)
            self.report_progress(min(start + self.batch_size, len(unique)), len(unique), "loglikelihood")
        return results

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple[int, ...]], counts: list[int]) -> list[torch.Tensor]:
        """fp32 log-probs [count, vocab] at the last `count` positions of each (right-padded) input."""
        width = max(len(t) for t in batch)
        scored = max(counts)
        padded = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), scored, dtype=torch.long)
        for row, tokens in enumerate(batch):
            padded[row, : len(tokens)] = torch.tensor(tokens)
            positions[row] = (torch.arange(scored) + len(tokens) - scored).clamp_min(0)
        with _final_positions(self.model, positions.to(self._device)):
            logits = self.model(padded.to(self._device))
        log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
        if not torch.isfinite(logits).all():  # lm-eval would turn NaN scores into a plausible accuracy
            raise ValueError("the model computed NaN or infinite logits: its weights are corrupt or do not fit "
                             "the kernels they were loaded for")
        return [log_probs[row, scored - count :] for row, count in enumerate(counts)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring: whole documents in max_length windows, one context token each."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation per distinct gen_kwargs, longest prompts first, cut at stop strings."""
        from tunemake.models.generation import generate

        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        outputs: list[str | None] = [None] * len(requests)
        done = 0
        for indices in groups.values():
            gen_kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=None)
            max_new = gen_kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
            sampling = _sampling_options(gen_kwargs)
            stop_ids = self.native_tokenizer.eos_ids | self._tokens_containing(until)
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in indices}
            order = sorted(indices, key=lambda i: (-len(prompts[i]), i))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                completions = generate(
                    self.model,
                    [prompts[i] for i in chunk],
                    max_new,
                    stop_ids=stop_ids,
                    seed=self.seed,
                    **sampling,
                )
                for i, completion in zip(chunk, completions):
                    tokens = completion.tokens
                    if completion.stop_token is not None and completion.stop_token not in self.native_tokenizer.eos_ids:
                        tokens = tokens + [completion.stop_token]  # its text may begin before the stop string
                    text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                done += len(chunk)
                self.report_progress(done, len(requests), "generate_until")
        return outputs

    def _tokens_containing(self, stops: list[str]) -> set[int]:
        """Tokens whose own text contains a stop string: generating one means the text has it, so stop early.

        Stop strings spread over several tokens are still honoured afterwards by cutting the
        decoded text; this set only saves generating up to max_gen_toks for nothing.
        """
        key = tuple(sorted(s for s in stops if s and "\ufffd" not in s))
        if key not in self._stop_token_cache:
            vocab = range(self.native_tokenizer.vocab_size)
            self._stop_token_cache[key] = {t for t in vocab if any(s in self.tok_decode([t]) for s in key)} if key else set()
        return self._stop_token_cache[key]


def _main_eos_id(tokenizer) -> int:
    """The id of the tokenizer config's eos_token (what HF calls eos_token_id), else the smallest eos id."""
    eos_text = tokenizer.special_tokens.get("eos_token")
    ids = tokenizer.encode(eos_text, add_bos=False) if eos_text else []
    if len(ids) == 1 and ids[0] in tokenizer.eos_ids:
        return ids[0]
    if not tokenizer.eos_ids:
        raise ValueError(f"{tokenizer.source}: the tokenizer has no end-of-sequence token")
    return min(tokenizer.eos_ids)


def _sampling_options(gen_kwargs: dict) -> dict:
    """lm-eval's generation kwargs -> tunemake generate() keywords; unknown keys are an error."""
    options = {"temperature": 0.0}
    if gen_kwargs.pop("do_sample", False):
        options["temperature"] = float(gen_kwargs.pop("temperature", 1.0) or 1.0)
    else:
        gen_kwargs.pop("temperature", None)
    for key in ("top_k", "top_p"):
        if gen_kwargs.get(key) is not None:
            options[key] = gen_kwargs.pop(key)
        gen_kwargs.pop(key, None)
    if gen_kwargs:
        raise ValueError(f"unsupported generation_kwargs for the native model: {sorted(gen_kwargs)}")
    return options


@contextmanager
def _final_positions(model, positions: torch.Tensor):
    """Makes the model's final norm (and so the output projection) see only `positions` [B, K].

    The norm and the projection act on each position alone, so computing them for the
    scored positions gives the same values as slicing the full logits afterwards.
    """

    def select(module, args):
        hidden = args[0]
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index),)

    handle = model.model.norm.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
