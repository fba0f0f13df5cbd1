"""Tiny random Hugging Face models saved with save_pretrained, the references for parity tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

SHORT_FACTORS = [1.0, 1.1, 1.3, 1.7, 2.2, 3.0]  # LongRoPE's per-pair stretches, for 12 rotary dims
LONG_FACTORS = [1.5, 2.0, 3.5, 5.0, 8.0, 12.0]
# name -> (model_type, config overrides); each exercises one feature of the family
ARCHITECTURES = {
    "llama": ("llama", {}),
    "llama3_rope": (
        "llama",
        {
            "rope_theta": 500000.0,
            # original context of 16 puts the slow/medium/fast split inside head_dim=16's frequencies
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama_linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama_tied_wide_heads": ("llama", {"tie_word_embeddings": True, "head_dim": 24}),
    "mistral_window": ("mistral", {"sliding_window": 6, "rope_theta": 1000000.0}),
    "qwen2_bias": ("qwen2", {"rope_theta": 1000000.0, "use_sliding_window": False}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": False}),
    "qwen3_qk_norm": ("qwen3", {"rope_theta": 1000000.0, "head_dim": 24, "tie_word_embeddings": True}),
    # use_sliding_window: layers from max_window_layers on attend to the last 6 tokens only
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    # GeGLU (tanh GELU), (1 + weight) norms in fp32, embeddings scaled by sqrt(hidden), head_dim != hidden/heads
    "gemma": ("gemma", {"head_dim": 24}),
    # + sandwich norms, soft-capped attention scores and logits (caps small enough to bite), a
    # query scale that is not head_dim, alternating sliding (window 6) and global layers
    "gemma2": ("gemma2", {"head_dim": 24, "sliding_window": 6, "query_pre_attn_scalar": 20,
                          "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5}),
    # + q/k norms with the (1 + weight) scale, local layers with their own plain RoPE base, global
    # layers with linear RoPE scaling, the layer pattern given as layer_types
    # fused qkv_proj and gate_up_proj, a window on every layer (Phi-3-mini-4k has 2047)
    "phi3": ("phi3", {"sliding_window": 6}),
    # Phi-4-mini: partial rotary (12 of 16 dims) and LongRoPE past an original context of 16
    "phi4_mini_longrope": ("phi3", {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 16,
                                    "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT_FACTORS,
                                                     "long_factor": LONG_FACTORS}}),
    "gemma3": ("gemma3_text", {"head_dim": 24, "sliding_window": 6, "query_pre_attn_scalar": 20,
                               "num_hidden_layers": 3,
                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                               "rope_parameters": {
                                   "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
}


def hf_config(model_type: str, **overrides):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                    "gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig,
                    "phi3": Phi3Config}[model_type]
    return config_class(**{**TINY, **overrides})


def randomize_(model, seed: int = 0, std: float = 0.15):
    """Every parameter random (norm weights around 1, biases nonzero) so no term can hide."""
    generator = torch.Generator().manual_seed(seed)
    # Gemma stores a norm's scale minus one: its norms are centred on 0 for an effective scale near 1
    centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(noise + (centre if "norm" in name else 0.0))
    return model


def make_hf_model(folder, model_type: str, seed: int = 0, **overrides):
    """A random transformers model saved to folder; returns the model in fp32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(model_type, **overrides), dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from a second thread, and on the shared 2-core machine a 2-thread
    OpenMP kernel stalls whenever a peer thread is descheduled (32 tokens: 1.4 s vs 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(ARCHITECTURES))
def hf_checkpoint(request, tmp_path):
    """(folder, transformers model) for each architecture variant."""
    model_type, overrides = ARCHITECTURES[request.param]
    folder = tmp_path / request.param
    return folder, make_hf_model(folder, model_type, **overrides)


def corpus(lines: int = 1500, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over a lazy dog while tunemake builds quantized checkpoints, "
        "eval reports and samples: 12 34 567 café naïve über déjà-vu (really?) yes! no... "
        "Hello World don't it's we're"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) for _ in range(lines)]


def train_sentencepiece(folder, vocab_size: int = 400) -> None:
    """A Llama 2 style sentencepiece BPE (byte fallback, identity normalisation, digits split)."""
    import io

    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())


LLAMA3_STYLE = {
    "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "bos": "<|begin_of_text|>",
    "eos": "<|eot_id|>",
    "chat_template": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
QWEN_STYLE = {
    "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "bos": None,
    "eos": "<|im_end|>",
    "chat_template": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def train_byte_level_bpe(folder, style: dict, vocab_size: int = 500) -> None:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) in the Llama 3 or Qwen style."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=style["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if style["bos"]:
        bos_id = tokenizer.token_to_id(style["bos"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{style['bos']} $A", pair=f"{style['bos']} $A {style['bos']} $B", special_tokens=[(style["bos"], bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": style["bos"],
        "eos_token": style["eos"],
        "pad_token": style["special"][0] if style["bos"] is None else None,
        "chat_template": style["chat_template"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
