"""The re-steering loop FMN's methods share: the attention loss plus the terms a config turns on.

Per step, as the official code does it (minus its defects): a reference latent, noise and a
uniform timestep; the UNet runs with probes on every cross-attention layer; the loss is the
plain L2 norm of the kept attention probabilities at the concept's tokens; AdamW. What trains
(UNet weights, a LoRA, token rows) is the `trainable` handed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from forget_me_not.attention import ProbeSet, install_probes
from forget_me_not.concepts import Concept, TokenMask, locate_in_pipeline, merge_positions
from forget_me_not.data import model_resolution
from forget_me_not.errors import FmnError
from forget_me_not.methods.fmn import terms as T
from forget_me_not.methods.fmn.adversary import Adversary
from forget_me_not.methods.fmn.references import build_references, pixel_weights
from forget_me_not.methods.fmn.stopping import PullCheck, stop_line
from forget_me_not.pipeline_io import Row, added_cond, autocast, encode_prompt, freeze
from forget_me_not.progress import Progress


def resolve(config: Any, concepts: Sequence[Concept]) -> Any:
    """The run's config with its steps totalled and its preserve prompts filled in."""
    prompts = config.preserve_prompts
    if config.preserve_weight > 0 and not prompts and config.preserve_set:
        from forget_me_not.recipes.prompt_sets import prompt_set

        avoid = list(dict.fromkeys([*(c.words for c in concepts), *config.also_avoid]))
        prompts = prompt_set(config.preserve_set, avoid)
    if config.preserve_weight > 0 and not prompts:
        raise FmnError("preserve_weight > 0 needs prompts to preserve: pass "
                       "--set preserve_prompts=[...], or set preserve_weight=0")
    return dataclasses.replace(config, steps=config.total_steps(len(concepts)), steps_per="run",
                               preserve_prompts=tuple(prompts))


@dataclass
class Step:
    """What one step's terms see."""

    number: int
    index: list[int]  # which concept rows
    batch: list[Row]
    noisy: torch.Tensor  # (B, C, h, w)
    t: torch.Tensor  # (B,)
    embeds: torch.Tensor  # (B, T, D) as encoded once
    cond: dict | None
    pixel_weights: torch.Tensor | None
    live_rows: list[Row] | None = None
    live_embeds: torch.Tensor | None = None
    live_cond: dict | None = None
    own: torch.Tensor | None = None


class Run:
    """The model and the helpers every term calls: predictions, noised latents, re-encoding."""

    def __init__(self, pipe: Any, config: Any, trainable: Any, gen: torch.Generator) -> None:
        self.pipe, self.config, self.trainable, self.gen = pipe, config, trainable, gen
        self.unet, self.device = pipe.unet, pipe.unet.device
        self.resolution = model_resolution(pipe)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.n_train_t = self.scheduler.config.num_train_timesteps
        self.probes: ProbeSet | None = None

    def predict(self, x, timesteps, hidden, cond, *, base: bool = False, original: bool = True):
        """The UNet's noise prediction; `base`: of the untouched model, without a graph."""
        with contextlib.ExitStack() as stack:
            if base:
                stack.enter_context(torch.no_grad())
                stack.enter_context(self.trainable.base_weights(original))
            stack.enter_context(autocast(self.device, self.config.mixed_precision))
            return self.unet(x, timesteps, encoder_hidden_states=hidden,
                             added_cond_kwargs=cond, return_dict=False)[0]

    def cond(self, rows: Sequence[Row]) -> dict | None:
        return added_cond(self.pipe, rows, self.resolution, self.device)

    def noised(self, rows: list[Row], index: list[int], pool: torch.Tensor | None, timesteps):
        """Noisy latents of `pool[index]` (None without a pool), the rows' embeddings, cond."""
        chosen = [rows[i] for i in index]
        embeds = torch.cat([row.embeds for row in chosen]).to(self.device)
        cond = self.cond(chosen)
        if pool is None:
            return None, embeds, cond
        clean = pool[index].to(self.device, self.unet.dtype)
        noise = torch.randn(clean.shape, generator=self.gen).to(self.device, self.unet.dtype)
        return self.scheduler.add_noise(clean, noise, timesteps), embeds, cond

    def live(self, rows: Sequence[Row]) -> tuple[torch.Tensor, dict | None]:
        """The rows' text states as the model in training computes them."""
        rows = self.trainable.live(rows)
        return torch.cat([row.embeds for row in rows]).to(self.device), self.cond(rows)

    def matched(self, x, timesteps, hidden, cond, target: torch.Tensor) -> torch.Tensor:
        """MSE of the trained prediction to `target`, with the probes off (not re-steered)."""
        self.probes.deactivate()
        pred = self.predict(x, timesteps, hidden, cond)
        return F.mse_loss(pred.float(), target.float())


def encode_rows(pipe: Any, concepts: Sequence[Concept], extra: str) -> list[Row]:
    """Every (concept, prompt) pair, encoded once, with the positions to re-steer."""
    rows = []
    for ci, concept in enumerate(concepts):
        for prompt in concept.prompts():
            positions = merge_positions(locate_in_pipeline(pipe, prompt, concept.words, extra))
            with torch.no_grad():
                embeds, pooled = encode_prompt(pipe, prompt)
            rows.append(Row(ci, embeds.detach(), None if pooled is None else pooled.detach(),
                            positions, prompt))
    return rows


def _terms(run: Run, concepts: list[Concept]) -> list[T.Term]:
    """The terms the config turns on, in the order their losses are summed."""
    cfg = run.config
    out: list[T.Term] = []
    if cfg.anchor_weight > 0:
        out.append(T.Anchor(run))
    if cfg.concept_anchor_weight > 0 and any(c.anchor for c in concepts):
        out.append(T.ConceptAnchor(run, concepts))
    if cfg.transparent_weight > 0:
        out.append(T.Transparent(cfg.transparent_weight))
    if cfg.preserve_weight > 0:
        out.append(T.Preserve(run, cfg.preserve_prompts))
    if cfg.hold_prompts:
        out.append(T.Hold(run))
    if getattr(cfg, "erase_weight", 0.0) > 0:
        out.append(T.Erase(run, concepts))
    return out


@dataclass
class EndPull:
    """Read the concepts' pull at the end of each run it is handed to: on `seed`'s latents,
    with the LoRA on `modules` only (None: everywhere). The reader, made in the first run, is
    kept, so every run is read on the same latents against the same base pulls."""

    seed: int
    modules: list[str] | None
    reader: PullCheck | None = None

    def prepare(self, run: Run, rows: list[Row], concepts: list[Concept]) -> None:
        """Before anything trains: the latents are the base model's own."""
        if self.reader is None:
            self.reader = PullCheck(run, rows, concepts, seed=self.seed)

    def read(self, run: Run) -> float:
        assert self.reader is not None, "prepare() first"
        with run.trainable.only_modules(self.modules):
            return self.reader.remaining(run)


def run_loop(pipe: Any, concepts: list[Concept], config: Any, trainable: Any,
             progress: bool, label: str = "re-steering",
             end_pull: EndPull | None = None) -> dict[str, Any]:
    """Train `trainable` with the attention loss and `config`'s terms; the pipeline is put back.

    Returns the trainable's result ("kind", "tensors", "lora_config") and the logs ("losses",
    "term_losses", "seconds"); with `end_pull`, also the concepts' remaining pull at the end
    ("end_pull"). On a non-finite loss, an error or Ctrl-C nothing is returned.
    """
    freeze(pipe)  # frozen parts first, before anything trains
    gen = torch.Generator("cpu").manual_seed(config.seed)
    run = Run(pipe, config, trainable, gen)
    rows = encode_rows(pipe, concepts, config.extra_positions)
    terms = _terms(run, concepts)
    check = PullCheck(run, rows, concepts) if getattr(config, "stop_pull", 0.0) > 0 else None
    if end_pull is not None:
        end_pull.prepare(run, rows, concepts)
    stop: dict[str, Any] | None = None
    references = build_references(pipe, concepts, config.reference, run.resolution,
                                  config.n_self_images, config.self_steps, config.seed)
    losses: list[float] = []
    term_losses: dict[str, list[float]] = {}
    started = time.perf_counter()
    stack = contextlib.ExitStack()
    try:
        params = trainable.setup()
        adversary = None
        if getattr(config, "adversarial_every", 0) > 0:
            adversary = stack.enter_context(Adversary(run, concepts, references).installed())
        keep = next((t for t in terms if isinstance(t, T.Preserve)), None)
        weight = getattr(config, "text_keep_weight", 0.0)
        if weight > 0 and keep is not None and getattr(trainable, "adapter", None):
            text_keep = T.TextKeep(weight, pipe.unet, keep.rows, trainable.adapter)
            if text_keep.layers:  # no LoRA on to_k / to_v: nothing text-side to keep
                terms.append(text_keep)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        run.probes = install_probes(pipe.unet)
        bar = Progress(config.steps, label, enabled=progress)
        for number in range(config.steps):
            index = [(number * config.batch_size + r) % len(rows)
                     for r in range(config.batch_size)]
            batch = [rows[i] for i in index]
            if adversary is not None:
                if adversary.due(number):
                    adversary.refresh(params)
                # The attack's token re-steered beside the word, on the same concept's images.
                found = [adversary.row_for(row.concept, number) for row in batch]
                batch += [row for row in found if row is not None]
            drawn = [references.sample(row.concept, gen) for row in batch]
            latents = torch.cat([latent for latent, _ in drawn])
            latents = latents.to(run.device, run.unet.dtype)  # (B, C, h, w)
            noise = torch.randn(latents.shape, generator=gen).to(run.device, latents.dtype)
            t = torch.randint(0, run.n_train_t, (len(batch),), generator=gen).to(run.device)
            embeds = torch.cat([row.embeds for row in batch]).to(run.device)  # (B, T, D)
            step = Step(number, index, batch, run.scheduler.add_noise(latents, noise, t), t,
                        embeds, run.cond(batch), pixel_weights(drawn, run.resolution))
            for term in sorted(terms, key=lambda term: term.draws_at):
                term.before(run, step)

            step.live_rows = trainable.live(batch)
            step.live_embeds = torch.cat([row.embeds for row in step.live_rows]).to(run.device)
            step.live_cond = run.cond(step.live_rows)
            run.probes.activate(TokenMask.from_positions([r.positions for r in batch],
                                                         embeds.shape[1]))
            step.own = run.predict(step.noisy, t, step.live_embeds, step.live_cond)
            loss = run.probes.loss(step.pixel_weights)
            shown = {"attention": loss.item()}
            for term in terms:
                value = term.loss(run, step)
                if value is None:
                    continue
                term_losses.setdefault(term.name, []).append(value.item())
                shown[term.name] = term_losses[term.name][-1]
                loss = loss + term.weight * value
            if not torch.isfinite(loss):
                raise FmnError(f"the re-steering loss became {loss.item()} at step {number + 1}:"
                               " lower the learning rate (--lr) or train in float32; nothing "
                               "was written")
            loss.backward()
            run.probes.deactivate()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            term_losses.setdefault("attention", []).append(shown["attention"])
            done = number + 1
            if check is not None and (done % config.stop_every == 0 or done == config.steps):
                shown["pull"] = check.check(run, done, params)
            bar.update(loss=losses[-1], **{k: v for k, v in shown.items() if k != "attention"})
            if "pull" in shown and shown["pull"] <= config.stop_pull:
                stop = {"at": done, "reached": True}
                break
        bar.close()
        if check is not None:
            if stop is None:  # never low enough: the state where the pull was lowest
                stop = {"at": check.restore_best(params), "reached": False}
            stop["pull"] = check.history
            bar.note(stop_line(stop, config.stop_pull))
        pull_at_end = None
        if end_pull is not None:
            pull_at_end = end_pull.read(run)
            bar.note(f"the pull at the end is {pull_at_end:.4f}")
        kind, tensors, lora_config = trainable.result()
    finally:
        if run.probes is not None:
            run.probes.remove()
        stack.close()
        trainable.restore()
    out = {"kind": kind, "tensors": tensors, "lora_config": lora_config, "losses": losses,
           "term_losses": term_losses, "seconds": round(time.perf_counter() - started, 3)}
    if stop is not None:
        out["stop"] = stop
    if pull_at_end is not None:
        out["end_pull"] = round(pull_at_end, 4)
    return out
