"""lm-evaluation-harness over the native model: a TemplateLM that `lm_eval.simple_evaluate` drives.

Imported only inside the eval step's child process (it imports torch and lm_eval).

Loglikelihood requests are answered per context (a multiple-choice document): one forward
pass runs the context once with every continuation packed after it, where lm-eval's HF model
runs the whole context again for each choice. Only the positions that score continuation
tokens go through the final norm and the output projection (with a 49k vocabulary that
projection is a fifth of a 135M model's work per position). A unit never shares a forward
pass with another document, so its answers depend on nothing else: they are the same at any
batch size and can be served from the request cache (tunemake.request_cache), which also lets
a killed eval resume. Generation runs in batches of `batch_size` in document order.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from tunemake.request_cache import RequestCache, digest

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
        cache: RequestCache | None = None,
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
        self.cache = cache or RequestCache(None, {})
        self._device = next(model.parameters()).device
        self._bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
        self._eot_id = _main_eos_id(tokenizer)
        self._stop_token_cache: dict[tuple[str, ...], set[int]] = {}
        self._request_tasks: list[str] | None = None

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
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM tokenizes and passes on tokens only: keep each request's task, so that a unit
        # holds one task's document and a task's answers never depend on the other tasks of the eval
        self._request_tasks = [str(getattr(request, "task_name", "")) for request in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_tasks = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, pack: bool = True,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy choice) per request.

        With pack, the requests of one task that share a context (a multiple-choice document) are
        one unit, answered by one forward pass over the context and its continuations packed after
        it (`_score_unit`), split so that no pass is longer than max_length; without, every
        request is a unit of its own (rolling windows, which share only a one-token context).
        Each unit is restored from the request cache when it is there.
        """
        tasks = self._request_tasks
        tasks = tasks if pack and tasks is not None and len(tasks) == len(requests) else [""] * len(requests)
        units: dict[tuple, set[tuple[int, ...]]] = defaultdict(set)  # (group, context) -> continuations
        placed = []  # per request: (its unit's group and context, its continuation)
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("lm-eval sent an empty context or continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            # the model sees (context + continuation)[:-1], cut to max_length from the left
            kept = (context + continuation)[-(self.max_length + 1) :]
            unit = (tasks[index] if pack else index, tuple(kept[: -len(continuation)]))
            units[unit].add(tuple(continuation))
            placed.append((unit, tuple(continuation)))

        work = [(unit, part) for unit in sorted(units, key=lambda u: (-len(u[1]), u))  # any order: same answers
                for part in _packed_parts(unit[1], sorted(units[unit]), self.max_length,
                                          self.model.args.rope_length_switch())]
        answers: dict[tuple, tuple[float, bool]] = {}
        restored = 0
        for done, (unit, continuations) in enumerate(work, 1):
            context = unit[1]
            key = self.cache.key("loglikelihood", [list(context), [list(c) for c in continuations]])
            scores = self.cache.get(key)
            if scores is None or len(scores) != len(continuations):
                scores = self._score_unit(context, continuations)
                self.cache.put(key, scores)
            else:
                restored += 1
            for continuation, (log_prob, greedy) in zip(continuations, scores):
                answers[unit, continuation] = (float(log_prob), bool(greedy))
            if done % 16 == 0 or done == len(work):
                self.report_progress(done, len(work), f"loglikelihood, {restored} restored")
        results = [answers[p] for p in placed]
        for (request_strings, _, _), answer in zip(requests, results):
            if request_strings is not None:  # rolling windows are cached per document instead
                self.cache_hook.add_partial("loglikelihood", request_strings, answer)
        return results

    @torch.inference_mode()
    def _score_unit(self, context: tuple[int, ...], continuations: list[tuple[int, ...]]) -> list[list]:
        """[log-prob, greedy] of each continuation after context, in one forward pass of batch 1.

        The context runs once; each continuation's tokens but its last follow it as a segment
        that sees the context and itself (RoPE positions as if it came right after the context).
        A continuation of one token needs no segment: the context's last position scores it.
        The answer depends only on (context, continuations), never on the batch or on the other
        documents: what lets the request cache serve it, and makes scores batch-size invariant.
        """
        tokens, positions, segments = list(context), list(range(len(context))), [0] * len(context)
        starts = []  # where each continuation's segment begins
        for number, continuation in enumerate(continuations, 1):
            starts.append(len(tokens))
            tokens += continuation[:-1]
            positions += range(len(context), len(context) + len(continuation) - 1)
            segments += [number] * (len(continuation) - 1)
        length = len(tokens)
        rows = torch.arange(len(context) - 1, length)  # every position that predicts a continuation token
        token_tensor = torch.tensor([tokens], device=self._device)
        if length == len(context) or len(continuations) == 1:  # a plain causal sequence
            logits = self.model(token_tensor, rows=rows.to(self._device))
        else:
            segment = torch.tensor(segments)
            position = torch.tensor(positions)
            mask = torch.ones(length, length, dtype=torch.bool).tril()
            mask &= (segment.unsqueeze(0) == 0) | (segment.unsqueeze(0) == segment.unsqueeze(1))  # windows: the model's
            logits = self.model(token_tensor, positions=position.to(self._device),
                                attention_mask=mask.to(self._device), rows=rows.to(self._device))
        if not torch.isfinite(logits).all():  # lm-eval would turn NaN scores into a plausible accuracy
            raise ValueError("the model computed NaN or infinite logits: its weights are corrupt or do not fit "
                             "the kernels they were loaded for")
        log_probs = F.log_softmax(logits[0].float(), dim=-1).cpu()
        first = len(context) - 1
        scores = []
        for start, continuation in zip(starts, continuations):
            picked = [0] + list(range(start - first, start - first + len(continuation) - 1))
            chosen = log_probs[picked]  # [len(continuation), vocab]
            target = torch.tensor(continuation, dtype=torch.long)
            scores.append([float(chosen.gather(1, target.unsqueeze(1)).sum()), bool((chosen.argmax(-1) == target).all())])
        return scores

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
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, pack=False)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation per task and gen_kwargs, cut at stop strings.

        Batches follow document order (not prompt length): raising `limit` adds batches after
        the existing ones instead of reshuffling them, so the request cache still serves those.
        A batch's texts can depend on its other rows (the kernels' reduction order changes with
        the batch), so a batch is one cache unit, keyed by all its prompts in order.
        """
        from tunemake.models.generation import generate

        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        repeat, seen = [], defaultdict(int)  # lm-eval sends a sampled request once per repeat
        for index, request in enumerate(requests):
            task, settings = str(getattr(request, "task_name", "")), json.dumps(request.args[1], sort_keys=True, default=str)
            groups[task, settings].append(index)
            identity = (task, _document_order(request), request.args[0], settings)
            repeat.append(seen[identity])
            seen[identity] += 1
        outputs: list[str | None] = [None] * len(requests)
        done = restored = 0
        for indices in groups.values():
            gen_kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=None)
            max_new = gen_kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
            sampling = _sampling_options(gen_kwargs)
            stop_ids = self.native_tokenizer.eos_ids | self._tokens_containing(until)
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in indices}
            order = sorted(indices, key=lambda i: (_document_order(requests[i]), repeat[i], i))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                seed = self.seed
                if sampling["temperature"] > 0 and any(repeat[i] for i in chunk):
                    # each repeat its own sample: a seed of its own where a batch holds later repeats
                    seed = int(digest([self.seed, [[prompts[i], repeat[i]] for i in chunk]])[:15], 16)
                key = self.cache.key("generate", {
                    "prompts": [prompts[i] for i in chunk], "max_new_tokens": max_new, "stop_ids": sorted(stop_ids),
                    "until": until, "sampling": sampling, "seed": seed,
                })
                texts = self.cache.get(key)
                if texts is None or len(texts) != len(chunk):
                    texts = self._generate_chunk(generate, [prompts[i] for i in chunk], max_new, stop_ids, until,
                                                 sampling, seed)
                    self.cache.put(key, texts)
                else:
                    restored += len(chunk)
                for i, text in zip(chunk, texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                done += len(chunk)
                self.report_progress(done, len(requests), f"generate_until, {restored} restored")
        return outputs

    def _generate_chunk(self, generate, prompts, max_new, stop_ids, until, sampling, seed) -> list[str]:
        completions = generate(self.model, prompts, max_new, stop_ids=stop_ids, seed=seed, **sampling)
        texts = []
        for completion in completions:
            tokens = completion.tokens
            if completion.stop_token is not None and completion.stop_token not in self.native_tokenizer.eos_ids:
                tokens = tokens + [completion.stop_token]  # its text may begin before the stop string
            texts.append(postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None))
        return texts

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


def _packed_parts(context: tuple, continuations: list[tuple], max_length: int, switch: int | None = None):
    """The continuations in runs whose packed pass (context, then each one's tokens but its last)
    stays within max_length; each continuation alone always fits (the context was cut for it).

    switch: the sequence length past which the model's RoPE changes (LongRoPE, dynamic NTK),
    which it decides from a pass's longest position: a continuation past it is scored alone
    (dynamic NTK stretches with every length), and the others are never packed with one that is.
    """
    def alone(continuation) -> bool:
        return switch is not None and len(context) + len(continuation) - 1 > switch

    part, length = [], len(context)
    for continuation in [c for c in continuations if not alone(c)]:
        if part and length + len(continuation) - 1 > max_length:
            yield part
            part, length = [], len(context)
        part.append(continuation)
        length += len(continuation) - 1
    if part:
        yield part
    for continuation in continuations:
        if alone(continuation):
            yield [continuation]


def _document_order(request) -> tuple:
    """(doc_id, idx) of an lm-eval Instance: integers sort numerically, anything else as text."""
    doc_id, idx = getattr(request, "doc_id", None), getattr(request, "idx", 0)
    return (0, doc_id, idx) if isinstance(doc_id, int) else (1, str(doc_id), idx)


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
