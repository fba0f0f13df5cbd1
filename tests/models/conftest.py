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
}


def hf_config(model_type: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return config_class(**{**TINY, **overrides})


def randomize_(model, seed: int = 0, std: float = 0.15):
    """Every parameter random (norm weights around 1, biases nonzero) so no term can hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(noise + (1.0 if "norm" in name else 0.0))
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


@pytest.fixture(params=sorted(ARCHITECTURES))
def hf_checkpoint(request, tmp_path):
    """(folder, transformers model) for each architecture variant."""
    model_type, overrides = ARCHITECTURES[request.param]
    folder = tmp_path / request.param
    return folder, make_hf_model(folder, model_type, **overrides)
