"""Native PyTorch Llama-family decoder (Llama 2/3.x, Mistral, TinyLlama, SmolLM, Qwen2/2.5, Qwen3, Gemma 1/2/3,
Phi-3/3.5/4).

Parameter names follow Hugging Face so a checkpoint's safetensors map 1:1 onto
`Transformer.state_dict()`. Numerics follow transformers' reference (RMSNorm in fp32,
rotate-half RoPE with fp32 angles) so logits agree to ~1e-6 in fp32.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
ARCHITECTURE_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                      "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
# transformers' config-class defaults for fields a config.json may leave out
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768, "gemma": 8192,
                         "gemma2": 8192, "gemma3_text": 131072, "phi3": 4096}
# transformers' Gemma 2/3 config defaults
GEMMA_DEFAULTS = {
    "gemma2": {"sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "sliding_window_pattern": 2, "rope_local_base_freq": None},
    "gemma3_text": {"sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
                    "final_logit_softcapping": None, "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0},
}
LAYER_TYPES = ("sliding_attention", "full_attention")
# Gemma3TextConfig's defaults: a multimodal Gemma 3's config.json keeps only the text_config fields that differ
GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
                        "bos_token_id": 2}
# near misses worth a word: what the checkpoint is, and what of it would load
NOT_SUPPORTED_HINTS = {
    "phi3small": " (Phi-3-small's blocksparse attention)",
    "phimoe": " (Phi-3.5-MoE's mixture of experts)",
}
# MLP activations by transformers' names; Gemma's "gelu" is the tanh approximation too (transformers maps it so)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE, else {"rope_type": "linear"|"dynamic"|"llama3"|"longrope", "factor": ..., ...}
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE turns only the first part of each head
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # per layer "sliding_attention" | "full_attention" (Gemma 2/3); None: every layer uses sliding_window if set
    layer_types: list[str] | None = None
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    activation: str = "silu"  # the MLP's gate: "silu" or "gelu_tanh" (Gemma)
    gemma_norms: bool = False  # Gemma: RMSNorm scales by (1 + weight), in fp32; embeddings scaled by sqrt(dim)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and the MLP too, and one before the MLP
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    local_rope_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (plain RoPE); rope_scaling is global only
    # Phi-3: q, k and v in one qkv_proj, gate and up in one gate_up_proj, kept fused as the checkpoint stores them
    # (names and quantized tensors stay 1:1 with transformers, and one matmul beats three)
    fused_projections: bool = False
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # keys of config.json we do not interpret, written back unchanged by to_hf_config
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({self.n_heads}) is not a multiple of num_key_value_heads ({self.n_kv_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must list {self.n_layers} of {', '.join(LAYER_TYPES)}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_length_switch(self) -> int | None:
        """The pass length past which RoPE changes for every position (LongRoPE's long factors,
        dynamic NTK's stretch), else None: a packed pass must not carry a continuation across it."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "longrope":
            return scaling["original_max_position_embeddings"]
        if scaling.get("rope_type") == "dynamic":
            return self.max_position_embeddings
        return None

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, None where it attends to every earlier token."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Reads a transformers config dict (v4 `rope_scaling` or v5 `rope_parameters` spelling)."""

        def fail(message: str):
            raise ValueError(f"{source}: {message}")

        if not isinstance(config, dict):
            fail("expected a JSON object")
        model_type = config.get("model_type")
        if model_type == "gemma3":  # the multimodal Gemma 3 (4B and larger): its text model, without the vision tower
            text = config.get("text_config")
            if not isinstance(text, dict):
                fail("a gemma3 config needs a 'text_config' object (its text model is what loads)")
            tied = {"tie_word_embeddings": config["tie_word_embeddings"]} if "tie_word_embeddings" in config else {}
            return cls.from_hf_config({**GEMMA3_TEXT_DEFAULTS, **tied, **text, "model_type": "gemma3_text"}, source)
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = NOT_SUPPORTED_HINTS.get(model_type, "")
            fail(f"model_type {model_type!r} is not supported{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}, "
                 "gemma3 (its text model)")

        def required_int(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"field {key!r} must be a positive integer, got {value!r}")
            return value

        dim = required_int("hidden_size")
        n_heads = required_int("num_attention_heads")
        n_kv_heads = config.get("num_key_value_heads") or n_heads
        # transformers' Qwen3Config defaults head_dim to 128, the others derive it
        head_dim = config.get("head_dim") or (128 if model_type == "qwen3" else 256 if model_type in GEMMA_TYPES
                                               else dim // n_heads)
        for key, value in (("num_key_value_heads", n_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                fail(f"field {key!r} must be a positive integer, got {value!r}")
        if model_type in GEMMA_TYPES:  # transformers' Gemma configs: hidden_activation wins over the legacy hidden_act
            activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        else:
            activation = config.get("hidden_act", "silu")
        allowed = ("gelu_pytorch_tanh", "gelu") if model_type in GEMMA_TYPES else ("silu",)
        if activation not in allowed:
            fail(f"hidden_act {activation!r} is not supported for {model_type} (only {', '.join(map(repr, allowed))})")

        gemma = dict(GEMMA_DEFAULTS.get(model_type, {}))
        gemma.update({k: config[k] for k in gemma if k in config})
        local_rope_theta = None
        nested = config.get("rope_parameters")
        if model_type == "gemma3_text" and isinstance(nested, dict) and set(nested) <= set(LAYER_TYPES) and nested:
            # transformers 5 writes Gemma 3's RoPE per layer type; local layers use plain RoPE
            local = nested.get("sliding_attention") or {}
            if not isinstance(local, dict) or (local.get("rope_type") or "default") != "default":
                fail(f"rope_parameters.sliding_attention must be plain RoPE, got {local!r}")
            local_rope_theta = local.get("rope_theta", gemma["rope_local_base_freq"])
            rope_theta, rope_scaling = _read_rope_settings(
                {"rope_parameters": nested.get("full_attention") or {},
                 **({"rope_theta": config["rope_theta"]} if config.get("rope_theta") else {})}, fail,
                default_theta=1000000.0)
        else:
            # Gemma 3's global layers default to a base of 1e6 (transformers 5's Gemma3TextConfig)
            rope_theta, rope_scaling = _read_rope_settings(
                config, fail, default_theta=1000000.0 if model_type == "gemma3_text" else 10000.0,
                phi3=model_type == "phi3")
            local_rope_theta = gemma.get("rope_local_base_freq")
        if local_rope_theta is not None and (not isinstance(local_rope_theta, (int, float)) or local_rope_theta <= 0):
            fail(f"the sliding layers' rope_theta must be a positive number, got {local_rope_theta!r}")
        rope_settings = config.get("rope_scaling") or config.get("rope_parameters") or {}
        partial = config.get("partial_rotary_factor") or rope_settings.get("partial_rotary_factor") or 1.0
        if partial != 1.0 and (model_type != "phi3" or not isinstance(partial, (int, float)) or not 0 < partial < 1):
            fail(f"partial_rotary_factor {partial!r} is not supported for {model_type}")
        if rope_scaling is not None and rope_scaling["rope_type"] == "longrope":
            half = int(head_dim * partial) // 2
            for key in ("short_factor", "long_factor"):
                if len(rope_scaling[key]) != half:
                    fail(f"rope 'longrope' {key!r} must have {half} entries (rotary dims / 2), got {len(rope_scaling[key])}")
        max_positions = config.get("max_position_embeddings", DEFAULT_MAX_POSITIONS[model_type])
        if rope_scaling is not None:
            if not isinstance(rope_scaling.get("factor"), (int, float)):
                fail(f"rope {rope_scaling['rope_type']!r} needs a numeric 'factor'")
            if rope_scaling["rope_type"] == "llama3":
                rope_scaling.setdefault("original_max_position_embeddings", max_positions)
                for key in ("low_freq_factor", "high_freq_factor"):
                    if not isinstance(rope_scaling.get(key), (int, float)):
                        fail(f"rope 'llama3' needs a numeric {key!r}")

        sliding_window = config.get("sliding_window") if model_type == "mistral" else gemma.get("sliding_window")
        layer_types = config.get("layer_types")
        if model_type in ("qwen2", "qwen3"):
            sliding_window = layer_types = None
            if config.get("use_sliding_window"):  # as transformers: windowed from layer max_window_layers on
                sliding_window = config.get("sliding_window", 4096)
                first = config.get("max_window_layers", 28)
                if not isinstance(first, int) or first < 0:
                    fail(f"field 'max_window_layers' must be a non-negative integer, got {first!r}")
                layer_types = config.get("layer_types") or [
                    "sliding_attention" if i >= first else "full_attention"
                    for i in range(required_int("num_hidden_layers"))]
                if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
                    fail(f"field 'sliding_window' must be a positive integer, got {sliding_window!r}")
        elif model_type in ("mistral", "phi3"):
            sliding_window = config.get("sliding_window")  # Phi-3-mini-4k: 2047, on every layer
            layer_types = None
        elif model_type in ("gemma2", "gemma3_text"):
            if config.get("use_bidirectional_attention"):
                fail("use_bidirectional_attention (an embedding model) is not supported")
            pattern = gemma["sliding_window_pattern"]
            if layer_types is None:
                if not isinstance(pattern, int) or pattern < 1:
                    fail(f"field 'sliding_window_pattern' must be a positive integer, got {pattern!r}")
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(required_int("num_hidden_layers"))]
        elif layer_types is not None and set(layer_types) != {"full_attention"}:
            fail(f"layer_types with sliding layers is not supported for {model_type}")
        else:
            layer_types = None
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = gemma.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                fail(f"field {key!r} must be a positive number, got {value!r}")
        if model_type == "qwen2":  # q/k/v always biased, o_proj and the MLP never
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(config.get("attention_bias", False))
            mlp_bias = model_type != "qwen3" and bool(config.get("mlp_bias", False))

        interpreted = {
            "model_type", "architectures", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "vocab_size",
            "num_hidden_layers", "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "sliding_window", "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
            "torch_dtype", "dtype", "partial_rotary_factor", "hidden_activation", "layer_types",
            "use_bidirectional_attention", "max_window_layers", *GEMMA_DEFAULTS["gemma3_text"],
        }
        try:
            return cls(
                vocab_size=required_int("vocab_size"),
                dim=dim,
                n_layers=required_int("num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=n_kv_heads,
                head_dim=head_dim,
                hidden_dim=required_int("intermediate_size"),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                # the Gemma configs tie by default, the others do not
                tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in GEMMA_TYPES)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=mlp_bias,
                sliding_window=sliding_window,
                layer_types=layer_types,
                qk_norm=model_type in ("qwen3", "gemma3_text"),
                activation=ACTIVATIONS[activation],
                gemma_norms=model_type in GEMMA_TYPES,
                sandwich_norms=model_type in ("gemma2", "gemma3_text"),
                query_pre_attn_scalar=gemma.get("query_pre_attn_scalar"),
                attn_logit_softcapping=gemma.get("attn_logit_softcapping"),
                final_logit_softcapping=gemma.get("final_logit_softcapping"),
                local_rope_theta=float(local_rope_theta) if local_rope_theta is not None else None,
                partial_rotary_factor=float(partial),
                fused_projections=model_type == "phi3",
                max_position_embeddings=max_positions,
                model_type=model_type,
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
                pad_token_id=config.get("pad_token_id"),
                torch_dtype=config.get("dtype") or config.get("torch_dtype"),
                extra={k: v for k, v in config.items() if k not in interpreted and not k.startswith("_")},
            )
        except (TypeError, ValueError) as error:
            fail(str(error))

    def to_hf_config(self) -> dict:
        """A config.json dict readable by transformers 4.45+ and 5 (legacy rope_theta/rope_scaling keys)."""
        config = dict(self.extra)
        config.update(
            architectures=[ARCHITECTURE_NAMES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu" if self.activation == "silu" else "gelu_pytorch_tanh",
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type in ("qwen2", "qwen3"):
            config.update(use_sliding_window=False, sliding_window=None)
            if self.sliding_window is not None and self.layer_types is not None:
                sliding = [i for i, kind in enumerate(self.layer_types) if kind == "sliding_attention"]
                config.update(use_sliding_window=True, sliding_window=self.sliding_window,
                              layer_types=list(self.layer_types),
                              max_window_layers=sliding[0] if sliding else self.n_layers)
        if self.model_type in GEMMA_TYPES:
            config["hidden_activation"] = "gelu_pytorch_tanh"
        if self.model_type in ("gemma2", "gemma3_text"):
            config.update(sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                          query_pre_attn_scalar=self.query_pre_attn_scalar,
                          attn_logit_softcapping=self.attn_logit_softcapping,
                          final_logit_softcapping=self.final_logit_softcapping)
        if self.model_type == "gemma3_text":
            config["rope_local_base_freq"] = self.local_rope_theta
        if self.model_type == "phi3":
            config.update(partial_rotary_factor=self.partial_rotary_factor, sliding_window=self.sliding_window)
            if self.rope_scaling and self.rope_scaling["rope_type"] == "longrope":
                # exactly the three keys transformers 4's Phi3Config (and Microsoft's remote code) accept
                config["rope_scaling"] = {"type": "longrope", "short_factor": self.rope_scaling["short_factor"],
                                          "long_factor": self.rope_scaling["long_factor"]}
                config["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if self.model_type != "qwen2":
            config.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{self.model_type} cannot express q/k/v bias without o_proj bias; use model_type 'qwen2'")
        if self.model_type == "mistral":
            config["sliding_window"] = self.sliding_window
        if self.torch_dtype:
            config["torch_dtype"] = self.torch_dtype
        return config


def _read_rope_settings(config: dict, fail, default_theta: float = 10000.0,
                        phi3: bool = False) -> tuple[float, dict | None]:
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        fail(f"rope settings must be an object, got {parameters!r}")
    parameters = dict(parameters)
    rope_theta = parameters.pop("rope_theta", None) or config.get("rope_theta", default_theta)
    if not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
        fail(f"field 'rope_theta' must be a positive number, got {rope_theta!r}")
    parameters.pop("partial_rotary_factor", None)  # read by from_hf_config
    rope_type = parameters.pop("rope_type", None) or parameters.pop("type", None) or "default"
    parameters.pop("type", None)
    if phi3 and rope_type in ("su", "yarn"):  # Phi-3's early names for LongRoPE (transformers maps them so)
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        fail(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(rope_theta), None
    if rope_type == "longrope":
        # the top-level field wins, as in transformers; Phi3Config's default is 4096
        original = (config.get("original_max_position_embeddings") or parameters.get("original_max_position_embeddings")
                    or (4096 if phi3 else None))
        if not isinstance(original, int) or original <= 0:
            fail("rope 'longrope' needs a positive integer 'original_max_position_embeddings'")
        parameters["original_max_position_embeddings"] = original
        for key in ("short_factor", "long_factor"):
            factors = parameters.get(key)
            if not isinstance(factors, list) or not all(isinstance(f, (int, float)) and f > 0 for f in factors):
                fail(f"rope 'longrope' needs {key!r}: a list of positive numbers")
        # the attention factor, from the configured factor or the context's stretch (as transformers)
        factor = parameters.get("factor") or config.get("max_position_embeddings", original) / original
        parameters["factor"] = factor
        if parameters.get("attention_factor") is None:
            parameters["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return float(rope_theta), {"rope_type": rope_type, **parameters}


def rope_inverse_frequencies(args: ModelArgs, seq_len: int, local: bool = False) -> torch.Tensor:
    """Per-pair rotation speeds (fp32, cpu) as transformers computes them for this rope type.

    seq_len only matters for "dynamic" (NTK) scaling, which stretches the base once the
    sequence outgrows max_position_embeddings. local: Gemma 3's sliding layers, plain RoPE
    with their own base.
    """
    dim = args.rotary_dim
    scaling = {"rope_type": "default"} if local else args.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    base = args.local_rope_theta if local else args.rope_theta
    if rope_type == "dynamic" and seq_len > args.max_position_embeddings:
        factor = scaling["factor"]
        stretch = factor * seq_len / args.max_position_embeddings - (factor - 1)
        base = base * stretch ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if rope_type == "longrope":  # per-pair stretches, the long set past the original context
        long = seq_len > scaling["original_max_position_embeddings"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        return 1.0 / (factors * base**exponents)
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: slow rotations divided by factor, fast kept, a smooth ramp between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context_len / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context_len / high_freq_factor) * ~(wavelen > old_context_len / low_freq_factor)
    return torch.where(is_medium, smoothed, scaled)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype, scale: float = 1.0):
    """RoPE's cos and sin [B|1, 1, T, rotary_dim] for positions [B|1, T], angles in fp32; LongRoPE
    scales both by its attention factor."""
    angles = positions.unsqueeze(-1).float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def _packed_mask(allowed: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """A packed sequence's [T, T] mask, with a sliding window applied by RoPE position."""
    if window is None:
        return allowed
    return allowed & (positions.unsqueeze(0) > positions.unsqueeze(1) - window)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (all of them unless the rotary is partial)."""
    turned = cos.shape[-1]
    if turned == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, rest = x[..., :turned], x[..., turned:]
    return torch.cat((head * cos + rotate_half(head) * sin, rest), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        # Gemma stores the scale minus one (its weights start at 0) and scales in fp32
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 even for bf16 activations, then scale in the activation dtype (as transformers
        # does); F.rms_norm is one fused kernel where the spelled-out formula takes five passes
        normalized = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return (normalized * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normalized.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer key/value cache of shape [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.fused = args.fused_projections
        self.split = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
        if self.fused:
            self.qkv_proj = nn.Linear(args.dim, sum(self.split), bias=args.qkv_bias)
        else:
            self.q_proj = nn.Linear(args.dim, self.split[0], bias=args.qkv_bias)
            self.k_proj = nn.Linear(args.dim, self.split[1], bias=args.qkv_bias)
            self.v_proj = nn.Linear(args.dim, self.split[2], bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.gemma_norms)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.gemma_norms)
        self.qk_norm = args.qk_norm
        self.scale = args.query_pre_attn_scalar**-0.5 if args.query_pre_attn_scalar else None  # None: 1/sqrt(head_dim)
        self.softcap = args.attn_logit_softcapping
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, key_len):
        batch, length, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            # only the slots written so far: attention cost grows with keys, not with the cache size
            k, v = k[:, :, :key_len], v[:, :, :key_len]
        # without a mask: causal for a block starting at slot 0, or one query that sees every key
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and length > 1,
                                                 scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            out = softcapped_attention(q, k, v, mask, self.scale or self.head_dim**-0.5, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Gemma 2's attention: scores squashed to (-cap, cap) by cap * tanh(scores / cap) before the
    mask and an fp32 softmax, as transformers' eager path does (SDPA has no softcap)."""
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    scores = torch.tanh(q @ k.transpose(2, 3) * scale / cap) * cap
    if mask is None and q.shape[2] > 1:  # a block from slot 0: plain causal
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fused = args.fused_projections
        if self.fused:
            self.gate_up_proj = nn.Linear(args.dim, 2 * args.hidden_dim, bias=args.mlp_bias)
        else:
            self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
            self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.gelu = args.activation == "gelu_tanh"

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)
        # Llama: the norm before the MLP; Gemma 2/3: the norm of the attention's output
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)
        self.sandwich = args.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)
            self.post_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)

    def forward(self, x, cos, sin, mask, input_pos, key_len):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, key_len)
        if not self.sandwich:
            h = x + attended
            return h + self.mlp(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(attended)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class DecoderStack(nn.Module):
    """The `model.` prefix of HF parameter names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args)
        # with tied embeddings the output projection reuses embed_tokens.weight and has no
        # state-dict entry of its own, matching HF files that omit lm_head.weight
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # explicit cpu so the buffer is real even when the model is built under torch.device("meta")
        self.register_buffer("inv_freq", rope_inverse_frequencies(args, 0), persistent=False)
        if args.local_rope_theta is not None:
            self.register_buffer("inv_freq_local", rope_inverse_frequencies(args, 0, local=True), persistent=False)
        if (args.rope_scaling or {}).get("rope_type") == "longrope":
            past_original = args.rope_scaling["original_max_position_embeddings"] + 1
            self.register_buffer("inv_freq_long", rope_inverse_frequencies(args, past_original), persistent=False)
        self.cache_len = 0
        if self.model.norm.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """transformers-style init for training from scratch: N(0, std) weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(0.0 if module.offset else 1.0)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None):
        """Allocates a static KV cache for `max_seq_len` slots (size it to the request, not the model)."""
        reference = self.model.norm.weight
        dtype = dtype or reference.dtype
        device = torch.device(device or reference.device)
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is not None and cache.k.shape[0] == batch_size and self.cache_len == max_seq_len:
            if cache.k.dtype == dtype and cache.k.device == device:
                # reuse keeps compiled decode graphs valid; stale slots are always masked out
                return
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype, device
            )
        self.cache_len = max_seq_len
        dynamic = (self.args.rope_scaling or {}).get("rope_type") == "dynamic"
        self.inv_freq = rope_inverse_frequencies(self.args, max_seq_len if dynamic else 0).to(device)
        for name in ("inv_freq_local", "inv_freq_long"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.cache_len = 0

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        left_pad: torch.Tensor | None = None,
        last_logits_only: bool = False,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_logits_only, [B, len(rows), vocab] with rows).

        input_pos: cache slots of the T tokens, consecutive and increasing; None runs without the
        cache (autograd-friendly).
        left_pad: per-row count of padding tokens at the left of the batch; those slots are
        masked out and RoPE positions start at 0 at each row's first real token.
        positions, attention_mask: for packed sequences without the cache (several continuations
        after one shared context): each token's RoPE position [T], and the boolean [T, T] mask of
        which tokens each one attends to (each layer's sliding window is applied here, by position).
        rows: only these positions [K] go through the final norm and the output projection, which
        act on each position alone: the same values as slicing the full logits, at a fraction of
        the cost when the vocabulary is large.
        """
        batch, length = tokens.shape
        device = tokens.device
        use_cache = input_pos is not None
        if use_cache and self.cache_len == 0:
            raise RuntimeError("input_pos given but no KV cache: call setup_cache(batch_size, max_seq_len) first")
        if (positions is None) != (attention_mask is None) or (positions is not None and use_cache):
            raise ValueError("positions and attention_mask go together, and only without the KV cache")
        slots = input_pos if use_cache else torch.arange(length, device=device)
        positions = slots.unsqueeze(0) if positions is None else positions.unsqueeze(0)
        if left_pad is not None:
            positions = (positions - left_pad.unsqueeze(1)).clamp_min(0)
        inv_freq = self.inv_freq
        rope_type = (self.args.rope_scaling or {}).get("rope_type")
        if not use_cache and rope_type == "dynamic":
            inv_freq = rope_inverse_frequencies(self.args, int(positions.max()) + 1)
        if rope_type == "longrope":  # as transformers: the long factors once this call reaches past the original context
            original = self.args.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(positions.max() + 1 > original, self.inv_freq_long.to(device), self.inv_freq.to(device))
        x = self.model.embed_tokens(tokens)
        if self.args.gemma_norms:  # sqrt(dim), rounded to the activation dtype first as transformers does
            x = x * torch.tensor(self.args.dim**0.5, dtype=x.dtype)
        scale = (self.args.rope_scaling or {}).get("attention_factor", 1.0) if rope_type == "longrope" else 1.0
        rotations = {False: _cos_sin(positions, inv_freq.to(device), x.dtype, scale)}
        if self.args.local_rope_theta is not None:
            rotations[True] = _cos_sin(positions, self.inv_freq_local.to(device), x.dtype)
        compiling = torch.compiler.is_compiling()
        if not use_cache:
            key_len = length
        elif compiling:
            key_len = self.cache_len  # static shapes: attend over the whole cache, masked
        else:
            key_len = int(input_pos.max()) + 1
        masks = {}  # per sliding window (None: full attention), made once for the layers that share it
        for index, layer in enumerate(self.model.layers):
            window = self.args.layer_window(index)
            if window not in masks:
                if attention_mask is None:
                    masks[window] = self._attention_mask(slots, key_len, left_pad, compiling, window)
                else:
                    masks[window] = _packed_mask(attention_mask, positions[0], window).view(1, 1, length, length)
            local = self.args.local_rope_theta is not None and self.args.layer_types[index] == "sliding_attention"
            cos, sin = rotations[local]
            x = layer(x, cos, sin, masks[window], input_pos, key_len)
        if last_logits_only:
            x = x[:, -1:]
        elif rows is not None:
            x = x[:, rows]
        x = self.model.norm(x)
        logits = F.linear(x, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _attention_mask(self, slots, key_len, left_pad, needs_mask, window):
        """Boolean [B|1, 1, T, key_len] mask, or None when SDPA needs none (see Attention.forward)."""
        if (
            not needs_mask
            and (window is None or key_len <= window)
            and (key_len == len(slots) or len(slots) == 1)  # a block from slot 0, or one query
            and (left_pad is None or not bool(left_pad.any()))
        ):
            return None
        keys = torch.arange(key_len, device=slots.device)
        allowed = keys.unsqueeze(0) <= slots.unsqueeze(1)
        if window is not None:
            allowed = allowed & (keys.unsqueeze(0) > slots.unsqueeze(1) - window)
        allowed = allowed.unsqueeze(0)
        if left_pad is not None:
            allowed = allowed & (keys.view(1, 1, -1) >= left_pad.view(-1, 1, 1))
            # padding queries see only themselves, so no row is fully masked (which would give NaN)
            allowed = allowed | (keys.unsqueeze(0) == slots.unsqueeze(1)).unsqueeze(0)
        return allowed.unsqueeze(1)
