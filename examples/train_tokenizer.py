"""Train a sentencepiece BPE tokenizer on a corpus and write it in Hugging Face layout.

    python examples/train_tokenizer.py --corpus CORPUS.txt --out OUT [--vocab-size 768]

OUT gets tokenizer.model (Llama-style ids: <unk>=0, <s>=1, </s>=2, no pad),
tokenizer_config.json and special_tokens_map.json, which
tunemake.models.load_tokenizer reads, plus the same BPE as tokenizer.json:
transformers 5 reads that one directly, while converting tokenizer.model
itself would need the protobuf package. Deterministic: the same corpus and
flags give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# sentencepiece needs about 256 pieces for the bytes plus the corpus' characters.
MIN_VOCAB_FOR_BYTE_FALLBACK = 320


def train(lines: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support the full vocab
        byte_fallback=vocab_size >= MIN_VOCAB_FOR_BYTE_FALLBACK,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Like Llama: keep text as is, so decode(encode(text)) == text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        num_threads=1,  # one thread keeps the merges deterministic
        minloglevel=2,
    )
    return model.getvalue()


def to_hf_tokenizer(model_bytes: bytes):
    """The sentencepiece BPE as a `tokenizers.Tokenizer` that encodes and decodes the same ids.

    sentencepiece merges the adjacent pair whose joined piece scores highest,
    and its BPE pieces are sorted by score, so ranking every (left, right)
    split of a piece by the piece's id gives the merge list.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, piece_id in vocab.items():
        if sp.is_byte(piece_id) or sp.is_control(piece_id) or sp.is_unknown(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in merges],
        unk_token=SPECIAL_TOKENS["unk_token"],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    # add_dummy_prefix=True, identity normalization: a "▁" before the text, every space a "▁".
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return tokenizer


def write_hf_folder(model_bytes: bytes, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model_bytes)
    to_hf_tokenizer(model_bytes).save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="text file, one sentence or paragraph per line")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=768)
    args = parser.parse_args()

    lines = [line for line in args.corpus.read_text().splitlines() if line.strip()]
    model_bytes = train(lines, args.vocab_size)
    write_hf_folder(model_bytes, args.out)
    vocab = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    print(f"trained BPE on {len(lines)} lines: {vocab} pieces -> {args.out}")


if __name__ == "__main__":
    main()
