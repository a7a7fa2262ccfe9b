"""Adversarial re-steering (robust mode, in the spirit of AdvUnlearn): the attack runs inside
the training loop.

Every `adversarial_every` steps, a token per concept is learnt by textual inversion on the model
*as it is being trained* (`adversarial_steps` steps of the denoising loss on the concept's
reference latents, only that token's row moving). Its prompts then join the re-steering batch
with the token's positions as the concept's, so the UNet lets go of whatever the attack found,
not only of the word. The token is kept between refreshes (a warm start from the concept's own
word), so the attack grows stronger as the model does. The text encoder is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from forget_me_not.concepts import Concept, locate_in_pipeline, merge_positions
from forget_me_not.errors import FmnError
from forget_me_not.pipeline_io import Row, encode_prompt, text_encoders

TEMPLATES = ("a photo of {}", "a picture of {}", "{}", "a drawing of {}")


class Adversary:
    """One inverted token per concept, refreshed on the current model."""

    def __init__(self, run: Any, concepts: Sequence[Concept], references: Any) -> None:
        from forget_me_not.concepts import pipeline_tokenizers

        cfg = run.config
        self.run, self.concepts, self.references = run, list(concepts), references
        self.every, self.steps, self.lr = (cfg.adversarial_every, cfg.adversarial_steps,
                                           cfg.adversarial_lr)
        self.pipe = run.pipe
        self.tokenizers = pipeline_tokenizers(self.pipe)
        self.encoders = text_encoders(self.pipe)
        self.tokens = [f"<fmn-adv{i}>" for i in range(len(self.concepts))]
        self.ids: list[list[int]] = []
        self.rows: dict[int, list[Row]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[Adversary]:
        """The adversary's tokens exist in the pipeline within, and never after."""
        from forget_me_not.evaluate import restored_text_state

        with restored_text_state(self.pipe):
            for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
                if any(t in tok.get_vocab() for t in self.tokens):
                    raise FmnError("the tokenizer already has the adversary's tokens: load a "
                                   "fresh pipeline")
                tok.add_tokens(self.tokens)
                enc.resize_token_embeddings(len(tok))
                ids = tok.convert_tokens_to_ids(self.tokens)
                table = enc.get_input_embeddings().weight
                with torch.no_grad():
                    for tid, concept in zip(ids, self.concepts, strict=True):
                        start = tok(concept.words, add_special_tokens=False)["input_ids"]
                        table[tid] = table[start].mean(0)  # warm start: the concept's word
                self.ids.append(ids)
            yield self

    def due(self, number: int) -> bool:
        return self.every > 0 and number % self.every == 0

    def refresh(self, trained: Sequence[torch.nn.Parameter]) -> None:
        """A few inversion steps per concept on the current model; then its rows re-encoded."""
        run, gen = self.run, self.run.gen
        tables = [enc.get_input_embeddings().weight for enc in self.encoders]
        frozen = [t.detach().clone() for t in tables]
        flags = [p.requires_grad for p in trained]
        for p in trained:
            p.requires_grad_(False)  # the attack moves the token, never the model
        for t in tables:
            t.requires_grad_(True)
        optimizer = torch.optim.Adam(tables, lr=self.lr)
        try:
            for step in range(self.steps * len(self.concepts)):
                ci = step % len(self.concepts)
                latent, _ = self.references.sample(ci, gen)
                latent = latent.to(run.device, run.unet.dtype)
                noise = torch.randn(latent.shape, generator=gen).to(run.device, latent.dtype)
                t = torch.randint(0, run.n_train_t, (1,), generator=gen).to(run.device)
                prompt = TEMPLATES[step % len(TEMPLATES)].format(self.tokens[ci])
                embeds, pooled = encode_prompt(self.pipe, prompt)
                row = Row(ci, embeds, pooled, [], prompt)
                pred = run.predict(run.scheduler.add_noise(latent, noise, t), t, embeds,
                                   run.cond([row]))
                loss = F.mse_loss(pred.float(), noise.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for table, keep, ids in zip(tables, frozen, self.ids, strict=True):
                        moved = table[ids].clone()
                        table.copy_(keep)  # only the adversary's rows may change
                        table[ids] = moved
        finally:
            for t in tables:
                t.requires_grad_(False)
                t.grad = None
            for p, g in zip(trained, flags, strict=True):
                p.requires_grad_(g)
        self.rows = {ci: self._encode(ci) for ci in range(len(self.concepts))}

    def _encode(self, ci: int) -> list[Row]:
        rows = []
        for template in TEMPLATES:
            prompt = template.format(self.tokens[ci])
            positions = merge_positions(locate_in_pipeline(self.pipe, prompt, self.tokens[ci]))
            with torch.no_grad():
                embeds, pooled = encode_prompt(self.pipe, prompt)
            rows.append(Row(ci, embeds.detach(), None if pooled is None else pooled.detach(),
                            positions, prompt))
        return rows

    def row_for(self, ci: int, number: int) -> Row | None:
        rows = self.rows.get(ci)
        return rows[number % len(rows)] if rows else None
