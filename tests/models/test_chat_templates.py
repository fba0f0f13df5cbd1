"""The chat templates of the newer families (Gemma, Phi-3) render as transformers renders them."""

import json

import pytest

from tests.models.conftest import train_sentencepiece
from tunemake.models import load_tokenizer

# the templates these families ship in tokenizer_config.json (Gemma 1/2/3 share the turn markup)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
TURNS = [{"role": "user", "content": " What is 2 + 2? "}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3 + 3?"}]


@pytest.mark.parametrize("template, messages", [(GEMMA, TURNS), (PHI3, [{"role": "system", "content": "Be brief."}, *TURNS])],
                         ids=["gemma", "phi3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_and_tokenizes_as_transformers(tmp_path, template, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    train_sentencepiece(tmp_path)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "legacy": True, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False)["input_ids"]


def test_gemma_template_refuses_a_system_turn(tmp_path):
    from jinja2.exceptions import TemplateError

    train_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "chat_template": GEMMA}))
    with pytest.raises(TemplateError, match="System role not supported"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "system", "content": "x"}, *TURNS])
