"""Tiny tokenizer and text dataset for running torchtitan 0.2.2 without its repository.

torchtitan's wheel ships neither ``tests/assets/tokenizer`` nor ``tests/assets/c4_test``.
:func:`build_assets` writes both from real human-written English, the docstrings of
Python's standard library (:func:`agoq.data.stdlib_docstrings`, no download):

- ``<out>/tokenizer/tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE with
  2048 entries (the llama3 ``debugmodel`` vocabulary size), trained on that text with
  HuggingFace ``tokenizers``; ``<|begin_of_text|>`` / ``<|end_of_text|>`` are BOS/EOS, as
  torchtitan 0.2.2's ``HuggingFaceTokenizer`` reads them from ``tokenizer_config.json``.
- ``<out>/data/train.jsonl``: one ``{"text": ...}`` record per docstring. torchtitan's
  ``c4_test`` loader (``load_dataset(path, split="train")``) reads it with
  ``--training.dataset c4_test --training.dataset_path <out>/data``.

Deterministic for a given Python version. Command line::

    python -m torchtitan_ext.assets ./tt_assets      # then see torchtitan_ext/debug_model.toml
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


@dataclass(frozen=True)
class Assets:
    """Where :func:`build_assets` put things."""

    tokenizer_dir: Path  # for --model.hf_assets_path
    dataset_dir: Path  # for --training.dataset_path (with --training.dataset c4_test)
    vocab_size: int
    n_records: int


def build_assets(
    out_dir: str | Path, *, max_chars: int = 400_000, vocab_size: int = 2048
) -> Assets:
    """Write the tokenizer and the dataset under ``out_dir`` (created; files overwritten)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from agoq.data import stdlib_docstrings

    out = Path(out_dir)
    tok_dir, data_dir = out / "tokenizer", out / "data"
    tok_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    # stdlib_docstrings joins docstrings with one blank line, and docstrings contain blank
    # lines themselves: split on paragraphs and regroup into ~1 KiB records instead.
    # (The full corpus is cached by agoq.data; its prefix is the same text.)
    text = stdlib_docstrings()[:max_chars]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    records, cur = [], ""
    for p in paragraphs:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= 1024:
            records.append(cur)
            cur = ""
    if cur:
        records.append(cur)
    with open(data_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r}) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(records, trainer=trainer)
    tok.save(str(tok_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Assets(tok_dir, data_dir, tok.get_vocab_size(), len(records))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m torchtitan_ext.assets OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    a = build_assets(args[0])
    print(f"tokenizer: {a.tokenizer_dir} ({a.vocab_size} entries)")
    print(f"dataset:   {a.dataset_dir} ({a.n_records} records)")


if __name__ == "__main__":
    main()
