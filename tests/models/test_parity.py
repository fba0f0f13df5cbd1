"""Logits of the native model equal transformers' (fp32, 1e-5) for every supported variant."""

import torch

from tests.models.conftest import make_hf_model
from tunemake.models import load_model

ATOL = 1e-5


def random_tokens(batch, length, seed=1, vocab=128):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected):
    difference = (actual - expected).abs().max().item()
    assert difference < ATOL, f"max |diff| {difference:.2e} >= {ATOL}"


@torch.no_grad()
def test_full_forward_matches_transformers(hf_checkpoint):
    folder, hf_model = hf_checkpoint
    tokens = random_tokens(2, 12)
    model = load_model(folder)
    assert_close(model(tokens), hf_model(tokens).logits)


@torch.no_grad()
def test_kv_cache_steps_match_full_forward(hf_checkpoint):
    folder, hf_model = hf_checkpoint
    tokens = random_tokens(2, 12)
    expected = hf_model(tokens).logits
    model = load_model(folder)
    model.setup_cache(batch_size=2, max_seq_len=16)
    prefill = 5
    logits = [model(tokens[:, :prefill], input_pos=torch.arange(prefill))]
    for position in range(prefill, 12):
        logits.append(model(tokens[:, position : position + 1], input_pos=torch.tensor([position])))
    assert_close(torch.cat(logits, dim=1), expected)


@torch.no_grad()
def test_static_shape_cache_path_matches(hf_checkpoint, monkeypatch):
    """Under torch.compile the model attends over the whole cache with a mask; same logits."""
    folder, hf_model = hf_checkpoint
    tokens = random_tokens(2, 12)
    expected = hf_model(tokens).logits
    model = load_model(folder)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model.setup_cache(batch_size=2, max_seq_len=20)
    logits = [model(tokens[:, :4], input_pos=torch.arange(4))]
    logits += [model(tokens[:, p : p + 1], input_pos=torch.tensor([p])) for p in range(4, 12)]
    assert_close(torch.cat(logits, dim=1), expected)


@torch.no_grad()
def test_chunked_prefill_matches(hf_checkpoint):
    """A prompt fed in chunks (a block not starting at slot 0 needs the causal mask)."""
    folder, hf_model = hf_checkpoint
    tokens = random_tokens(1, 12)
    model = load_model(folder)
    model.setup_cache(batch_size=1, max_seq_len=12)
    chunks = [model(tokens[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 5), (5, 9), (9, 12))]
    assert_close(torch.cat(chunks, dim=1), hf_model(tokens).logits)


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows(hf_checkpoint):
    """Padded rows, with and without the cache, give each row's own unpadded logits."""
    folder, hf_model = hf_checkpoint
    lengths = [12, 7, 9]
    width = max(lengths)
    rows = [random_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    left_pad = torch.tensor([width - n for n in lengths])
    padded = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    model = load_model(folder)

    no_cache = model(padded, left_pad=left_pad)
    model.setup_cache(batch_size=3, max_seq_len=width + 4)
    prefill = model(padded[:, :10], input_pos=torch.arange(10), left_pad=left_pad)
    steps = [model(padded[:, p : p + 1], input_pos=torch.tensor([p]), left_pad=left_pad) for p in range(10, width)]
    cached = torch.cat([prefill, *steps], dim=1)

    for i, row in enumerate(rows):
        expected = hf_model(row[None]).logits[0]
        assert_close(no_cache[i, left_pad[i] :], expected)
        assert_close(cached[i, left_pad[i] :], expected)


@torch.no_grad()
def test_left_padded_batch_matches_transformers_padded_batch(tmp_path):
    """Same padded batch through transformers (attention_mask + position_ids) as a second reference."""
    hf_model = make_hf_model(tmp_path, "llama")
    tokens = random_tokens(2, 10)
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, :4] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    expected = hf_model(tokens, attention_mask=attention_mask, position_ids=position_ids).logits
    actual = load_model(tmp_path)(tokens, left_pad=torch.tensor([0, 4]))
    assert_close(actual[0], expected[0])
    assert_close(actual[1, 4:], expected[1, 4:])


@torch.no_grad()
def test_dynamic_rope_beyond_trained_length(tmp_path):
    """Dynamic NTK scaling changes nothing inside max_position_embeddings and stretches beyond it."""
    hf_model = make_hf_model(
        tmp_path, "llama", max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    model = load_model(tmp_path)
    for length in (6, 14):
        tokens = random_tokens(1, length)
        assert_close(model(tokens), hf_model(tokens).logits)


@torch.no_grad()
def test_sliding_window_changes_logits(tmp_path):
    """Guard for the mistral parity case: the window of 6 must matter on 12 tokens."""
    make_hf_model(tmp_path, "mistral", sliding_window=6)
    model = load_model(tmp_path)
    tokens = random_tokens(1, 12)
    windowed = model(tokens)
    model.args.sliding_window = None
    full = model(tokens)
    assert torch.equal(windowed[:, :6], full[:, :6])
    assert (windowed[:, 6:] - full[:, 6:]).abs().max() > 1e-3


def test_bf16_is_as_accurate_as_transformers_bf16(tmp_path):
    """bf16 cannot match bit for bit; its error against the fp32 reference must match transformers' bf16 error."""
    hf_model = make_hf_model(tmp_path, "qwen2", use_sliding_window=False)
    tokens = random_tokens(2, 300)  # long enough for the fp32 RoPE angles to matter
    with torch.no_grad():
        reference = hf_model(tokens).logits
        hf_error = (hf_model.to(torch.bfloat16)(tokens).logits.float() - reference).abs().mean()
        logits = load_model(tmp_path, dtype=torch.bfloat16)(tokens)
    assert logits.dtype == torch.bfloat16
    our_error = (logits.float() - reference).abs().mean()
    assert our_error < 1.25 * hf_error, (our_error, hf_error)


def test_training_from_scratch_reduces_loss():
    """No-cache forward supports autograd: a few Adam steps on a fixed batch lower the loss."""
    from tunemake.models import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)
    model = Transformer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@torch.no_grad()
def test_longrope_past_the_original_context(tmp_path):
    """LongRoPE switches to the long factors once a call reaches past the original context (16 here),
    as transformers does: a 24-token forward, and a KV-cache decode that crosses position 16."""
    from tests.models.conftest import ARCHITECTURES

    model_type, overrides = ARCHITECTURES["phi4_mini_longrope"]
    hf_model = make_hf_model(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    tokens = random_tokens(1, 24)
    assert_close(model(tokens), hf_model(tokens).logits)
    short = hf_model(tokens[:, :16]).logits  # within the original context: the short factors
    assert_close(model(tokens[:, :16]), short)
    assert (model(tokens)[:, :16] - short).abs().max() > 1e-3  # the long factors do change the first 16

    expected, cache = [], None
    model.setup_cache(batch_size=1, max_seq_len=24)
    ours = [model(tokens[:, :10], input_pos=torch.arange(10))]
    out = hf_model(tokens[:, :10], use_cache=True)
    expected.append(out.logits)
    cache = out.past_key_values
    for position in range(10, 24):
        ours.append(model(tokens[:, position : position + 1], input_pos=torch.tensor([position])))
        out = hf_model(tokens[:, position : position + 1], past_key_values=cache, use_cache=True)
        expected.append(out.logits)
        cache = out.past_key_values
    assert_close(torch.cat(ours, dim=1), torch.cat(expected, dim=1))
