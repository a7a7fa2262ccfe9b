"""token_rows: FMN's attention loss reaching only the rows of the concept's words in the text
encoder(s)' token-embedding table, through the frozen text encoder and UNet.

A prompt-level block, named as such: every prompt without those words is left exactly as it was,
but the UNet still draws the concept from any other embedding of it (the base text encoder, a
learnt token). It suits a model users reach only through prompts; it removes nothing from the
UNet, and its patch says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.fmn.loop import resolve, run_loop
from forget_me_not.methods.fmn.train import to_patch
from forget_me_not.methods.token_rows.config import TokenRowsConfig
from forget_me_not.methods.token_rows.rows import RowDeltas, word_token_ids
from forget_me_not.patch import Patch, model_hash
from forget_me_not.pipeline_io import Row, encode_prompt

PROMPT_LEVEL_NOTE = ("prompt-level block: changes the words' token rows only; the UNet still "
                     "draws the concept from any other embedding of it")


class RowsTrainable:
    """The row deltas of the concepts' words, per text encoder."""

    def __init__(self, pipe: Any, words: Sequence[str]) -> None:
        self.pipe, self.words = pipe, list(words)
        self.rows: RowDeltas | None = None
        self.was_training = pipe.unet.training

    def setup(self) -> list[torch.Tensor]:
        per_word = [word_token_ids(self.pipe, w) for w in self.words]
        ids = [list(dict.fromkeys(i for word in per_word for i in word[e]))
               for e in range(len(per_word[0]))]
        self.rows = RowDeltas(self.pipe, ids)
        self.rows.attach()
        return list(self.rows.deltas)

    def live(self, rows: Sequence[Row]) -> list[Row]:
        """Re-encoded with a graph, so the loss reaches the rows."""
        return [Row(r.concept, *encode_prompt(self.pipe, r.prompt), r.positions, r.prompt)
                for r in rows]

    @contextlib.contextmanager
    def base_weights(self, original: bool = True) -> Iterator[None]:
        yield  # the UNet is untouched; base predictions take the rows' base encodings

    def result(self) -> tuple[str, dict[str, torch.Tensor], None]:
        return "embedding", self.rows.tensors(), None

    def restore(self) -> None:
        if self.rows is not None:
            self.rows.detach()
        for p in self.pipe.unet.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.pipe.unet.train(self.was_training)


def train(pipe: Any, concepts: Sequence[Concept], config: TokenRowsConfig | None = None, *,
          progress: bool = True) -> Patch:
    """Re-steer the concepts' token rows; return an "embedding" patch."""
    concepts = list(concepts)
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    if any(c.token_words for c in concepts):
        # Inverted placeholder tokens exist only beside their embedding file.
        raise FmnError("token_rows changes the rows of words the tokenizer knows; for tokens "
                       "learnt by `fmn invert` use --method fmn")
    config = resolve(config or TokenRowsConfig(), concepts)
    base_hash = model_hash(pipe)
    trainable = RowsTrainable(pipe, [c.words for c in concepts])
    out = run_loop(pipe, concepts, config, trainable, progress, label="token rows")
    patch = to_patch(pipe, "token_rows", concepts, config, out, base_hash)
    patch.metadata["scope"] = PROMPT_LEVEL_NOTE
    return patch
