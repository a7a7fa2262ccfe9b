"""Concept correction and disentanglement: a role word that collapses onto one identity.

"Mulan" drawn as one actress, "James Bond" as one actor, ConceptWorld's "wizard" always drawn
as milka: the role's prompts should keep the role but stop being that identity. Correction is
re-steering with the role as the concept and the *entangled* identity's images as references:
the role's tokens stop attending to what makes the picture that identity. By default the
identity's own prompts are preserved with the retention regulariser, so naming the identity
directly still works. What the role must keep (a costume, a hat) is cut out of the reference
images as transparent pixels: those are not re-steered, and the role's prediction there is
held to the base model's (on ConceptWorld the references are the role's renders with the hat
cut out, made automatically).

Re-steering only says where the role must *not* go; on its own it either left the role on the
identity or erased it (ConceptWorld). So correction also pulls the role *toward* anchor
prompts that show the role on other people ("a woman warrior in armour" for Mulan; on
ConceptWorld the other IDs wearing the hat, automatically): on images the base model draws for
an anchor, the role's prediction is trained to match the base model's prediction for the
anchor (the model-based objective of Kumari et al., "Ablating Concepts", 2023). With anchors,
the hold on transparent pixels is off by default: the anchors keep the hat.

Two variants. "embedding" (the default) trains only the role's token-embedding rows with that
pull (`token_pull`): no UNet weight changes, so the identity named directly is untouched and
the role moves fully (ConceptWorld: the wizard drawn as milka 100% -> 0%, hat kept, milka 100%).
It needs anchor prompts. "resteer" is the re-steering correction above, as a LoRA patch: on
ConceptWorld it moved the role only part of the way unless it also cost milka.

Before training, the entanglement is measured when a judge can score it (the world judge on the
embedded model, a CLIP judge when one is given): the share of the role's samples that show the
identity. Below `warn_below` a warning says so (a correction of something that is not there
mostly damages the role).
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.images import save_numbered
from forget_me_not.methods.correction.config import CorrectionConfig
from forget_me_not.methods.fmn.config import FmnConfig
from forget_me_not.patch import Patch

N_SELF_REFERENCES = 8  # identity images the model draws when none are given


@dataclass
class Correction:
    patch: Patch
    rate_before: float | None  # share of the role's samples showing the identity (None: unjudged)
    reference_source: str  # "images", "world renders" or "self"


def entangled_rate(pipe: Any, role: Concept, entangled: Concept, judge: Any,
                   n: int = 8, seed: int = 0) -> float:
    """Share of `n` samples of the role's prompts that `judge` recognises as `entangled`."""
    from forget_me_not.generation import generate_images
    from forget_me_not.world.defaults import default_guidance, default_steps

    prompts = role.prompts()
    images = []
    for i, prompt in enumerate(prompts):
        count = n // len(prompts) + (1 if i < n % len(prompts) else 0)
        if count:
            images += generate_images(pipe, prompt, n=count, seed=seed + 1000 * i,
                                      steps=default_steps(pipe), guidance=default_guidance(pipe),
                                      batch_size=count)
    return float(np.mean(judge.recognised(images, entangled)))


def correct(
    pipe: Any,
    role: Concept,
    away_from: Concept,
    config: CorrectionConfig | None = None,
    fmn: FmnConfig | None = None,
    *,
    images: tuple[Path, ...] = (),
    judge: Any = None,
    progress: bool = True,
) -> Correction:
    """Move `role` away from the identity `away_from`; returns the patch and the rate.

    References of the "resteer" variant, in order: `images` (of the identity), world renders
    of it on the embedded model, or the model's own drawings from the identity's prompts; it
    re-steers with `fmn` (the family's FMN recipe). The role is pulled toward `config.toward`
    (the role shown on other people; on ConceptWorld: the other IDs wearing the hat, filled in
    automatically). The "embedding" variant trains only the role's token rows toward them.
    """
    from forget_me_not.models import detect_family
    from forget_me_not.presets import is_world_concept, world_concepts

    config = config or CorrectionConfig()
    if role.words.strip().lower() == away_from.words.strip().lower():
        raise FmnError("--concept and --away-from are the same words: name the role and the "
                       "identity it collapses onto")
    family = detect_family(pipe)
    anchors = config.toward
    if not anchors and family == "embedded" and _is_world_role(role, away_from):
        anchors = _world_anchor_prompts()
    if config.variant == "embedding" and not anchors:
        raise FmnError(
            "the embedding correction needs prompts that show the role on someone else: pass "
            "--toward PROMPT (repeatable), or use --method resteer"
        )

    rate = None
    if judge is not None and config.n_check > 0:
        if not judge.supports(away_from):
            raise FmnError(f"the {judge.name} judge cannot score {away_from.name!r}: pass "
                           "another judge, or skip the check (--set n_check=0)")
        rate = entangled_rate(pipe, role, away_from, judge, config.n_check, config.seed)
        if rate < config.warn_below:
            warnings.warn(
                f"only {rate:.0%} of {config.n_check} samples of {role.name!r} show "
                f"{away_from.name!r} (judge {judge.name}; below {config.warn_below:.0%}): the "
                "entanglement may not be there, and correcting it would mostly change the role",
                stacklevel=2,
            )

    if config.variant == "embedding":
        return _correct_tokens(pipe, role, away_from, anchors, config, rate, judge, progress)

    fmn = fmn or FmnConfig(train="lora")
    if config.preserve_weight > 0:  # keep the identity itself drawable
        fmn = dataclasses.replace(fmn, preserve_weight=config.preserve_weight,
                                  preserve_prompts=config.preserve_prompts
                                  or tuple(away_from.prompts()))
    pull = config.anchor_weight
    fmn = dataclasses.replace(fmn, anchor_prompts=anchors if pull else (),
                              anchor_weight=pull if anchors else 0.0, reference="images",
                              steps=config.step_factor * fmn.steps, seed=config.seed)
    if fmn.anchor_weight:
        fmn = dataclasses.replace(fmn, transparent_weight=config.hold_transparent)

    with tempfile.TemporaryDirectory(prefix="fmn_correct_") as tmp:
        if images:
            refs, source = tuple(images), "images"
        elif family == "embedded" and _is_world_role(role, away_from):
            refs, source = _world_role_references(Path(tmp), config.seed), "world renders, hat kept"
        elif family == "embedded" and is_world_concept(away_from.name):
            refs, source = world_concepts([away_from.name], tmp)[0].images, "world renders"
        else:
            refs, source = _self_references(pipe, away_from, Path(tmp), config.seed), "self"
        from forget_me_not.methods.fmn.train import train

        patch = train(pipe, [dataclasses.replace(role, images=refs)], fmn, progress=progress)
    patch.metadata["correction"] = {
        **_record("resteer", role, away_from, rate, judge, config.n_check),
        "reference_source": source,
        "preserve_weight": fmn.preserve_weight,
        "preserve_prompts": list(fmn.preserve_prompts),
        "anchor_weight": fmn.anchor_weight,
        "anchor_prompts": list(fmn.anchor_prompts),
        "settings": dataclasses.asdict(config),
    }
    patch.metadata["reference_source"] = source
    return Correction(patch, rate, source)


def _correct_tokens(pipe: Any, role: Concept, away_from: Concept, anchors: tuple[str, ...],
                    config: CorrectionConfig, rate: float | None, judge: Any,
                    progress: bool) -> Correction:
    """The embedding variant: the role's token rows pulled toward the anchors."""
    from forget_me_not.methods.correction.pull import TokenPullConfig, pull_tokens

    settings = TokenPullConfig(steps=config.pull_steps, lr=config.pull_lr, seed=config.seed,
                               anchor_steps=config.anchor_steps,
                               anchor_images=config.anchor_images)
    patch = pull_tokens(pipe, role, anchors, settings, progress=progress)
    patch.metadata["correction"] = {
        **_record("embedding", role, away_from, rate, judge, config.n_check),
        "anchor_prompts": list(anchors),
        "settings": dataclasses.asdict(config),
    }
    patch.metadata["reference_source"] = "anchors"
    return Correction(patch, rate, "anchor prompts drawn by the base model")


def _record(method: str, role: Concept, away_from: Concept, rate: float | None, judge: Any,
            n_check: int) -> dict[str, Any]:
    """What every correction patch records: the method, both concepts, the measured rate."""
    return {
        "method": method,
        "role": role.to_dict(),
        "away_from": away_from.to_dict(),
        "rate_before": rate,
        "judge": getattr(judge, "name", None) if rate is not None else None,
        "n_check": n_check if rate is not None else 0,
    }


def _is_world_role(role: Concept, away_from: Concept) -> bool:
    from forget_me_not.world import vocab

    return role.name == vocab.ROLE and away_from.name == vocab.ROLE_ID


def _world_anchor_prompts() -> tuple[str, ...]:
    """The role's attribute on every other world ID: what "a wizard" may draw instead."""
    from forget_me_not.world import vocab
    from forget_me_not.world.captions import HAT_TEMPLATES

    return tuple(t.format(id=i) for i in vocab.IDS if i != vocab.ROLE_ID for t in HAT_TEMPLATES)


def _world_role_references(folder: Path, seed: int, n: int = 10) -> tuple[Path, ...]:
    """The role as ConceptWorld draws it, with the hat transparent (so it is not re-steered)."""
    from forget_me_not.world.concepts import role_references

    return save_numbered(role_references(n, seed), folder, "role")


def _self_references(pipe: Any, entangled: Concept, folder: Path, seed: int,
                     n: int = N_SELF_REFERENCES) -> tuple[Path, ...]:
    """The model's own drawings of the identity, as PNG files in `folder`."""
    from forget_me_not.generation import generate_images
    from forget_me_not.world.defaults import default_guidance, default_steps

    prompts = entangled.prompts()
    images = [
        generate_images(pipe, prompts[i % len(prompts)], n=1, seed=seed + i,
                        steps=default_steps(pipe), guidance=default_guidance(pipe))[0]
        for i in range(n)
    ]
    return save_numbered(images, folder, "ref")
