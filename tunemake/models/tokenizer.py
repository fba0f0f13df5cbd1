"""Tokenizers of HF model folders: tokenizer.json (via `tokenizers`) or sentencepiece tokenizer.model.

Special ids come from the folder's config files, the chat template from tokenizer_config.json
or chat_template.jinja, rendered in a sandboxed jinja2 environment.
"""

import json
import re
from datetime import datetime
from pathlib import Path

from tunemake.models.checkpoint import read_json


class JsonBackend:
    """A HF tokenizer.json through the `tokenizers` library (byte-level BPE: Llama 3, SmolLM, Qwen)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.tokenizer = RustTokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception on bad files
            raise ValueError(f"{path}: cannot load tokenizer: {error}") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def adds_bos_by_default(self, bos_id: int | None) -> bool:
        # a post-processor (TemplateProcessing) that adds bos shows up when encoding nothing
        ids = self.tokenizer.encode("", add_special_tokens=True).ids
        return bos_id is not None and ids[:1] == [bos_id]


class SentencePieceBackend:
    """A sentencepiece tokenizer.model (Llama 2 style) with HF's handling of special tokens in text.

    Text is split on special/added tokens first (as transformers does), and each piece between
    them is encoded by sentencepiece with its dummy-prefix space (transformers' legacy Llama
    tokenizer). Like transformers' Metaspace, a piece that already starts with a space gets no
    second one; sentencepiece alone would encode " x" as "▁▁x".
    """

    def __init__(self, path: Path, added_tokens: dict[str, int]):
        import sentencepiece

        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot load sentencepiece model: {error}") from None
        sp = self.processor
        self.special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        self.special.update(added_tokens)
        self.special_ids = set(self.special.values())
        self.added = {i: token for token, i in added_tokens.items()}
        self.space_id = sp.piece_to_id("\u2581")
        if sp.is_unknown(self.space_id):
            raise ValueError(f"{path}: the vocabulary lacks the word-boundary piece '\u2581'")
        self.vocab_size = max(sp.get_piece_size(), max(self.added, default=-1) + 1)
        # longest first so a token that contains another wins
        names = sorted(self.special, key=len, reverse=True)
        self.split_pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        pieces = self.split_pattern.split(text) if self.split_pattern else [text]
        ids: list[int] = []
        for piece in pieces:
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece == " ":
                ids.append(self.space_id)
            elif piece:
                # the dummy prefix sentencepiece adds stands in for the space we remove
                ids.extend(self.processor.encode(piece[1:] if piece.startswith(" ") else piece))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Pieces to bytes ('▁' is a space, <0xNN> a raw byte), dropping the one dummy-prefix space at the start."""
        sp = self.processor
        chunks: list[bytes] = []
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    chunks.append((self.added.get(i) or sp.id_to_piece(i)).encode())
            elif sp.is_byte(i):
                chunks.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                chunks.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
        text = b"".join(chunks).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        i = self.processor.piece_to_id(token)
        return None if self.processor.is_unknown(i) else i

    def adds_bos_by_default(self, bos_id: int | None) -> bool:
        return bos_id is not None  # the Llama 2 convention


class Tokenizer:
    def __init__(self, backend, bos_id, eos_ids, pad_id, add_bos, chat_template, special_tokens, source):
        self.backend = backend
        self.bos_id: int | None = bos_id
        self.eos_ids: set[int] = eos_ids
        self.pad_id: int = pad_id
        self.add_bos = add_bos
        self.chat_template: str | None = chat_template
        self.special_tokens: dict[str, str] = special_tokens  # e.g. {"bos_token": "<s>"} for templates
        self.source = source
        self.vocab_size: int = backend.vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids; bos is prepended only if asked and the model's tokenizer adds one (Qwen never does)."""
        ids = self.backend.encode(text)
        if add_bos and self.add_bos:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for an instruct model; encode it with add_bos=False (templates write bos themselves)."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
        template = _compiled_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)


def load_tokenizer(folder) -> "Tokenizer":
    folder = Path(folder)
    tokenizer_config = _optional_json(folder / "tokenizer_config.json")
    special_map = _optional_json(folder / "special_tokens_map.json")
    generation_config = _optional_json(folder / "generation_config.json")
    model_config = _optional_json(folder / "config.json")

    def token_string(key: str) -> str | None:
        value = tokenizer_config.get(key, special_map.get(key))
        return value.get("content") if isinstance(value, dict) else value

    if (folder / "tokenizer.json").is_file():
        backend = JsonBackend(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        added = {
            entry["content"]: int(i)
            for i, entry in tokenizer_config.get("added_tokens_decoder", {}).items()
            if isinstance(entry, dict) and "content" in entry
        }
        backend = SentencePieceBackend(folder / "tokenizer.model", added)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")

    def token_id(key: str) -> int | None:
        token = token_string(key)
        if token is None:
            return None
        i = backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: {key} {token!r} is not in the vocabulary")
        return i

    def config_ids(key: str) -> list[int]:
        ids = []
        for config in (generation_config, model_config):
            value = config.get(key)
            ids.extend(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    bos_id = token_id("bos_token")
    if bos_id is None and config_ids("bos_token_id"):
        bos_id = config_ids("bos_token_id")[0]
    eos_token_id = token_id("eos_token")
    eos_ids = set(config_ids("eos_token_id")) | ({eos_token_id} if eos_token_id is not None else set())
    pad_id = token_id("pad_token")
    if pad_id is None:
        pad_id = (config_ids("pad_token_id") or [eos_token_id if eos_token_id is not None else min(eos_ids, default=0)])[0]
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:
        add_bos = backend.adds_bos_by_default(bos_id)
    add_bos = bool(add_bos) and bos_id is not None
    special_tokens = {key: token_string(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=pad_id,
        add_bos=add_bos,
        chat_template=_read_chat_template(folder, tokenizer_config),
        special_tokens={key: value for key, value in special_tokens.items() if value is not None},
        source=folder,
    )


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _read_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None and (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return template


_templates: dict = {}


def _compiled_template(source: str):
    """Compiles once per template text in a sandbox: a checkpoint's template cannot reach Python internals."""
    if source not in _templates:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, indent=None, separators=None, sort_keys=False):
            # unlike jinja's own tojson, no HTML escaping: templates emit JSON for the model, not a browser
            return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _templates[source] = environment.from_string(source)
    return _templates[source]
