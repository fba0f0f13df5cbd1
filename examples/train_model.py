"""Train a tiny Llama from scratch on a text corpus (CPU, fp32) and save it in Hugging Face layout.

    python examples/train_model.py --corpus CORPUS.txt --tokenizer TOKENIZER_DIR --out OUT [--steps 500]

Every line of the corpus becomes <s> line </s>; the lines are joined into one
token stream and each step trains on random windows of it (AdamW, linear
warmup then cosine decay, gradient clipping). The defaults (1.9M parameters:
2 layers, dim 256, 16 heads, hidden 768) keep every linear layer's input
width a multiple of 256, so int4 with group size 256 quantizes all of them.

OUT gets config.json, model.safetensors, the tokenizer files and
train_metrics.json (losses, time, tokens seen). Progress goes to stdout and,
when TUNEMAKE_PROGRESS is set, as JSON lines to that file. The same seed and
flags on the same machine give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tunemake.models import ModelArgs, Tokenizer, Transformer, load_tokenizer, save_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder (train_tokenizer.py output)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    # Many small heads (head_dim 16): in our runs 4 or 8 heads often stayed on the
    # loss plateau before the facts are learned, and learned them without carrying
    # them over to the task's unseen question wordings.
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--n-kv-heads", type=int, default=None, help="default: n-heads")
    parser.add_argument("--hidden-dim", type=int, default=768, help="MLP intermediate size")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of steps)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args()


def token_stream(corpus: Path, tokenizer: Tokenizer, eos_id: int) -> torch.Tensor:
    ids: list[int] = []
    for line in corpus.read_text().splitlines():
        if line.strip():
            ids.extend(tokenizer.encode(line, add_bos=True))
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Inputs and next-token targets for batch_size random windows of seq_len tokens."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def learning_rate(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay only the matrices of the linear layers, not norms or the (tied) embedding.
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed_tokens" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def report_progress(done: int, total: int, message: str) -> None:
    print(f"step {done}/{total} {message}", flush=True)
    progress_file = os.environ.get("TUNEMAKE_PROGRESS")
    if progress_file:
        with open(progress_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"done": done, "total": total, "message": message}) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(args.seed)
    started = time.time()

    tokenizer = load_tokenizer(args.tokenizer)
    eos_id = min(tokenizer.eos_ids)
    stream = token_stream(args.corpus, tokenizer, eos_id)
    model_args = ModelArgs(
        vocab_size=tokenizer.vocab_size,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads or args.n_heads,
        head_dim=args.dim // args.n_heads,
        hidden_dim=args.hidden_dim,
        norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=eos_id,
    )
    model = Transformer(model_args)
    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    generator = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {len(stream)} corpus tokens, {args.steps} steps", flush=True)

    logged: list[dict] = []
    recent: list[float] = []
    for step in range(args.steps):
        lr = learning_rate(step, args.lr, warmup, args.steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = random_windows(stream, args.batch_size, args.seq_len, generator)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        recent.append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or step == 0:
            mean_loss = sum(recent) / len(recent)
            logged.append({"step": done, "loss": round(mean_loss, 4), "lr": lr})
            report_progress(done, args.steps, f"loss {mean_loss:.3f}")
            recent = []

    train_seconds = time.time() - started
    model.eval()
    save_checkpoint(model.state_dict(), model_args, args.out, tokenizer_from=args.tokenizer)
    metrics = {
        "steps": args.steps,
        "parameters": n_params,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "corpus_tokens": len(stream),
        "first_loss": logged[0]["loss"],
        "final_loss": logged[-1]["loss"],
        "train_seconds": round(train_seconds, 1),
        "log": logged,
    }
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"final loss {metrics['final_loss']:.3f} after {train_seconds:.0f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
