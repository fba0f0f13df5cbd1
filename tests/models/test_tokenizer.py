"""Tokenizers trained inside the test, compared with transformers' tokenizers on the same files."""

import json

import pytest

from tests.models.conftest import LLAMA3_STYLE, QWEN_STYLE, train_byte_level_bpe, train_sentencepiece
from tunemake.models import load_tokenizer

TEXTS = [
    "Hello World",
    "the quick brown fox, don't it's café naïve über",
    "two  spaces\nnew line\n\n\ttab and trailing space ",
    "digits 1234567890 and punctuation?!... (yes)",
    "unseen: 日本語 emoji 🙂 ñ Ω",
    "x",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2? "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3 + 3</b> & \"quotes\"?"},
]


def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    train_sentencepiece(folder)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "legacy": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_sentencepiece_matches_transformers(sentencepiece_folder):
    ours, reference = load_tokenizer(sentencepiece_folder), hf_tokenizer(sentencepiece_folder)
    texts = TEXTS + ["</s> special <s>tokens</s>in text", "<unk> stays", " leading", "  two leading", " "]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    assert (ours.bos_id, ours.eos_ids, ours.vocab_size) == (1, {2}, reference.vocab_size)


def test_sentencepiece_byte_fallback_round_trips(sentencepiece_folder):
    ours = load_tokenizer(sentencepiece_folder)
    text = "ünïcödé 🙂 漢字 mixed with words"
    ids = ours.encode(text)
    assert any(0x03 <= i < 0x03 + 256 for i in ids)  # byte pieces were used
    assert ours.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("style", [LLAMA3_STYLE, QWEN_STYLE], ids=["llama3", "qwen"])
def test_byte_level_bpe_matches_transformers(tmp_path, style):
    train_byte_level_bpe(tmp_path, style)
    ours, reference = load_tokenizer(tmp_path), hf_tokenizer(tmp_path)
    texts = TEXTS + [" leading space", f"{style['eos']}inline{style['special'][1]} specials"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    assert ours.bos_id == reference.bos_token_id
    assert ours.eos_ids == {reference.eos_token_id}
    assert ours.vocab_size == len(reference)
    rendered = ours.apply_chat_template(MESSAGES)
    assert rendered == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES[:2], add_generation_prompt=False) == reference.apply_chat_template(
        MESSAGES[:2], tokenize=False, add_generation_prompt=False
    )
    assert ours.encode(rendered, add_bos=False) == reference.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )


def test_bos_only_where_the_model_uses_one(tmp_path):
    train_byte_level_bpe(tmp_path / "llama3", LLAMA3_STYLE)
    train_byte_level_bpe(tmp_path / "qwen", QWEN_STYLE)
    llama3, qwen = load_tokenizer(tmp_path / "llama3"), load_tokenizer(tmp_path / "qwen")
    assert llama3.encode("hi")[0] == llama3.bos_id
    assert llama3.encode("hi", add_bos=False) == llama3.encode("hi")[1:]
    assert qwen.bos_id is None and qwen.encode("hi") == qwen.encode("hi", add_bos=False)
    assert qwen.pad_id == qwen.backend.token_to_id("<|endoftext|>")


def test_eos_ids_collect_every_config_file(tmp_path):
    train_byte_level_bpe(tmp_path, LLAMA3_STYLE)
    ids = {name: load_tokenizer(tmp_path).backend.token_to_id(name) for name in LLAMA3_STYLE["special"]}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|end_of_text|>"], 3]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 4}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_ids == {ids["<|eot_id|>"], ids["<|end_of_text|>"], 3, 4}
    assert tokenizer.pad_id == ids["<|eot_id|>"]  # no pad token anywhere: the tokenizer's eos


def test_chat_template_file_and_sandbox(tmp_path):
    from jinja2.exceptions import SecurityError, TemplateError

    train_byte_level_bpe(tmp_path, QWEN_STYLE)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "<é>"}]) == '[user]"<é>"'
    (tmp_path / "chat_template.jinja").write_text("{{ messages.append('x') }}")
    with pytest.raises(SecurityError):
        load_tokenizer(tmp_path).apply_chat_template([])
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        load_tokenizer(tmp_path).apply_chat_template([])


def test_missing_tokenizer_and_unknown_special_token_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    train_byte_level_bpe(tmp_path, QWEN_STYLE)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|missing|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<\|missing\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
