"""The world's tokenizer: a real CLIP BPE tokenizer whose vocabulary is learned from world words.

Every world word becomes exactly one token (merges learned by BPE over the word list); single
letters and digits stay in the vocabulary, so an unknown word falls back to letters, and any
other symbol maps to CLIP's unknown token `<|endoftext|>` instead of crashing.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from forget_me_not.world import vocab

MAX_LENGTH = 16  # tokens per prompt, start and end included; the longest world caption needs 11
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PUNCTUATION = ",.!?'-:;()\"&/"


def _symbols() -> list[str]:
    return list(string.ascii_lowercase) + list(string.digits) + list(PUNCTUATION)


def build_tokenizer_files(folder: Path) -> None:
    """Learn BPE merges over the world words and write CLIP-format vocab.json and merges.txt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = list(vocab.all_words())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    symbols = _symbols()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=symbols,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    # Each word and each lone symbol is a corpus line, so every merge a word needs is learned and
    # every symbol exists both bare and as a word end ("a" and "a</w>").
    tok.train_from_iterator(words * 4 + symbols, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ordered = [s for s in symbols] + [s + "</w>" for s in symbols]
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in ordered:
            ordered.append(merged)
    ordered += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(ordered)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def load_tokenizer(folder: Path):
    """A `CLIPTokenizer` from the world's vocabulary files."""
    from transformers import CLIPTokenizer

    merges = (folder / "merges.txt").read_text().splitlines()[1:]
    return CLIPTokenizer(
        vocab=json.loads((folder / "vocab.json").read_text()),
        merges=[tuple(m.split(" ")) for m in merges if m],
        model_max_length=MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
