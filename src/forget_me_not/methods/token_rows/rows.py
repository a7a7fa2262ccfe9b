"""Trainable deltas on a few rows of the text encoder(s)' token-embedding table.

Used by the token-embedding correction (`methods.correction.pull`) and by the `token_rows`
method: only the rows of the words that spell a concept change, so every prompt
without those words keeps exactly the base model's text states (and pictures).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from forget_me_not.concepts import pipeline_tokenizers
from forget_me_not.errors import FmnError


def word_token_ids(pipe: Any, words: str) -> list[list[int]]:
    """Per tokenizer (text-encoder order), the ids that spell `words`; unknown words refused."""
    out = []
    for tok in pipeline_tokenizers(pipe):
        ids = list(tok(words, add_special_tokens=False)["input_ids"])
        unk = getattr(tok, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids and tok.unk_token not in words):
            raise FmnError(
                f"the tokenizer does not know {words!r}: learn a token for it with `fmn invert` "
                "and forget those with --method fmn, or use other words"
            )
        out.append(list(dict.fromkeys(ids)))
    return out


class RowDeltas:
    """A trainable delta per token id, added to the embedding output wherever the token is."""

    def __init__(self, pipe: Any, ids: Sequence[Sequence[int]]) -> None:
        from forget_me_not.pipeline_io import text_encoders

        encoders = text_encoders(pipe)
        self.names = ["text_encoder", "text_encoder_2"][: len(encoders)]
        self.ids = [torch.tensor(list(i), dtype=torch.int64) for i in ids]
        self.deltas = [
            torch.zeros(len(i), e.get_input_embeddings().weight.shape[1],
                        device=e.device, requires_grad=True)
            for i, e in zip(ids, encoders, strict=True)
        ]
        self.encoders = encoders
        self.handles: list[Any] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.attach()
        try:
            yield
        finally:
            self.detach()

    def attach(self) -> None:
        for enc, ids, delta in zip(self.encoders, self.ids, self.deltas, strict=True):
            self.handles.append(enc.get_input_embeddings().register_forward_hook(
                _adder(ids.to(delta.device), delta)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The patch's tensors: per text encoder, the token ids and their row deltas."""
        out = {}
        for name, ids, delta in zip(self.names, self.ids, self.deltas, strict=True):
            out[f"{name}.token_ids"] = ids.clone()
            out[f"{name}.token_delta"] = delta.detach().to("cpu", torch.float32).clone()
        return out


def _adder(ids: torch.Tensor, delta: torch.Tensor):
    def hook(module, inputs, output):
        hits = (inputs[0].unsqueeze(-1) == ids).to(delta.dtype)  # (B, T, k)
        return output + (hits @ delta).to(output.dtype)

    return hook
