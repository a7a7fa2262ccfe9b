"""Concept sets forgotten in one run: "nsfw" (real SD models) and "unsafe" (the embedded
ConceptWorld model), what `fmn forget --category nsfw` forgets with no --concept; and world
reference renders for world concepts.

The NSFW set names themes, never content: its prompts are deliberately non-explicit, and it
needs no images (the model draws its own references, or the reference is pure noise). Its
concepts are the ones ConceptBench's NSFW category judges with NudeNet on the I2P-style prompt
list (bench/conceptbench.yaml), so the result is measured with
`fmn bench --suite conceptbench --concepts "nudity,sexual content" --patch P --out DIR`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError

EMBEDDED = "embedded"
REAL_FAMILIES = ("sd1", "sd2", "sdxl")
EMBEDDED_PRESET = "unsafe"

# Names as ConceptBench's NSFW category spells them (judged there by NudeNet).
NSFW_CONCEPTS: tuple[str, ...] = ("nudity", "sexual content")
# Several phrasings, so re-steering meets the words in the contexts users type them in.
NSFW_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a painting of {}",
    "an image depicting {}",
    "a picture with {}",
    "{}",
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    families: tuple[str, ...]  # model families it is meant for
    reference: str  # default reference source when the user chooses none: "self" | "images"
    build: Callable[[Path], list[Concept]]  # ref_dir -> concepts (renders written there)
    # Re-steer each concept in its own run and stack the patches (see `api.forget`).
    separately: bool = False


def _nsfw(_ref_dir: Path) -> list[Concept]:
    return [Concept(name, "nsfw", NSFW_TEMPLATES) for name in NSFW_CONCEPTS]


def _unsafe(ref_dir: Path) -> list[Concept]:
    from forget_me_not.world import vocab

    return world_concepts(vocab.UNSAFE_OBJECTS, ref_dir)


PRESETS: dict[str, Preset] = {
    "nsfw": Preset("nsfw", "nudity and sexual content (no images needed)", REAL_FAMILIES,
                   "self", _nsfw),
    # Separately: a joint run left the gun drawn (benchmarks/notes, "Stacking, the unsafe preset").
    "unsafe": Preset("unsafe", "every unsafe ConceptWorld concept, with world renders",
                     (EMBEDDED,), "images", _unsafe, separately=True),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise FmnError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def family_preset(family: str) -> str:
    """The unsafe set of a model family: "unsafe" on the embedded model, "nsfw" on SD."""
    return EMBEDDED_PRESET if family == EMBEDDED else "nsfw"


def preset_concepts(name: str, family: str, ref_dir: str | Path) -> list[Concept]:
    """The preset's concepts for a model of `family`; refuses a preset meant for other models."""
    preset = get_preset(name)
    if family not in preset.families:
        other = "unsafe" if family == EMBEDDED else "nsfw"
        raise FmnError(
            f"preset {name} is for {'/'.join(preset.families)} models but this one is "
            f"{family}: use preset {other}"
        )
    return preset.build(Path(ref_dir))


def is_world_concept(name: str) -> bool:
    from forget_me_not.world.concepts import all_concepts

    return any(c.name == name for c in all_concepts())


# The attacker's images of a world concept are other scenes than the forgetting's references
# (renders at seed 0): an attack that learns from the very images a forgetting trained on
# reads lower than one with the attacker's own (BENCHMARKS.md, "The attacker's own images").
ATTACK_RENDER_SEED = 1


def world_attack_images(name: str, ref_dir: str | Path) -> tuple[Path, ...]:
    """Renders of world concept `name` for an attack's anchors, none of them a reference the
    forgetting trains on; written under `ref_dir`."""
    return world_concepts([name], ref_dir, seed=ATTACK_RENDER_SEED)[0].images


def world_concepts(names: Sequence[str], ref_dir: str | Path, n_refs: int = 10,
                   seed: int = 0) -> list[Concept]:
    """ConceptWorld concepts with `n_refs` reference renders each, written under `ref_dir`."""
    from forget_me_not.world.concepts import fmn_concept

    return [fmn_concept(name, Path(ref_dir) / name.replace(" ", "_"), n_refs=n_refs, seed=seed)
            for name in names]
