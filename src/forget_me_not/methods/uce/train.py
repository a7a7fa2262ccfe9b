"""UCE: erase concepts from every cross-attention to_k / to_v in one closed-form solve.

The text state of a concept is the text encoder's output at its last token, in the bare
concept words (and, with `expand_prompts`, inside each of its templates), as the official
`uce_sd_erase.py` takes it. Every concept of a run is edited in the same solve.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from forget_me_not.concepts import Concept, check_known, pipeline_tokenizers
from forget_me_not.errors import FmnError
from forget_me_not.methods.uce.config import UceConfig
from forget_me_not.methods.uce.edit import System, low_rank_edit
from forget_me_not.patch import Patch, family_of, library_versions, model_hash, run_name
from forget_me_not.pipeline_io import encode_prompt

COMMON_CONCEPTS = (  # the 'common' preserve set: everyday things an edit should leave alone
    "a person", "a man", "a woman", "a child", "a dog", "a cat", "a horse", "a bird", "a car",
    "a house", "a tree", "a flower", "a city", "a mountain", "the sea", "a table", "a chair",
    "a book", "food", "a landscape", "a portrait", "a painting", "a photograph", "claude monet",
    "pablo picasso", "rembrandt", "salvador dali", "andy warhol", "leonardo da vinci",
)


class Encoded:
    """Text-encoder states (T, D) per prompt, encoded in batches and kept."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.cache = pipe, {}

    def prefetch(self, prompts: list[str], batch: int = 32) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            with torch.no_grad():
                states = encode_prompt(self.pipe, chunk)[0].float().cpu()  # (B, T, D)
            self.cache.update(zip(chunk, states, strict=True))

    def __call__(self, prompt: str) -> torch.Tensor:
        if prompt not in self.cache:
            self.prefetch([prompt])
        return self.cache[prompt]


def text_state(pipe: Any, prompt: str, encoded: Encoded | None = None) -> torch.Tensor:
    """(D,) the encoder output at the prompt's last token (before end-of-text)."""
    tok = pipeline_tokenizers(pipe)[0]
    mask = tok(prompt, padding="max_length", max_length=tok.model_max_length,
               truncation=True)["attention_mask"]
    last = max(0, sum(mask) - 2)  # "" gives 0: the start token, as the official script does
    return (encoded or Encoded(pipe))(prompt)[last]


def tail_states(pipe: Any, prompt: str, guide: str, words: str, anchor: str,
                encoded: Encoded | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, D) states of `prompt` from the concept's first token to the end, and (k, D) states
    of `guide` at the matching places: the concept's tokens -> the anchor's last token (the
    last prefix token for ''), end-of-text and padding -> the same slot after the anchor."""
    tok = pipeline_tokenizers(pipe)[0]
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length,
              truncation=True)["input_ids"]
    n_c = len(tok(words, add_special_tokens=False)["input_ids"])
    n_g = len(tok(anchor, add_special_tokens=False)["input_ids"]) if anchor.strip() else 0
    length = sum(tok(prompt, truncation=True)["attention_mask"]) - 1  # up to end-of-text
    start = length - n_c  # the concept's first token (it ends the prompt's words)
    if start < 1 or len(ids) <= start:
        raise FmnError(f"UCE's tail states need the concept at the end of {prompt!r}")
    encoded = encoded or Encoded(pipe)
    states, guides = encoded(prompt), encoded(guide)  # (T, D)
    places = [start + n_g - 1 if n_g else start - 1] * n_c
    places += [p - n_c + n_g for p in range(start + n_c, states.shape[0])]
    places = [min(max(p, 0), guides.shape[0] - 1) for p in places]
    return states[start:], guides[places]


def _check_words(pipe: Any, words: str, what: str) -> None:
    if not words.strip():
        return
    for tok in pipeline_tokenizers(pipe):
        try:
            check_known(tok, words)
        except FmnError as err:
            raise FmnError(f"{what} {words!r}: {err}") from None


def _preserved(config: UceConfig, concepts: Sequence[Concept]) -> list[str]:
    words = {w for c in concepts for w in c.words.lower().split()}
    out = list(config.preserve)
    if config.preserve_set == "conceptworld":
        from forget_me_not.world.concepts import all_concepts

        out += [c.name for c in all_concepts()]
    elif config.preserve_set == "common":
        out += list(COMMON_CONCEPTS)
    return [p for p in dict.fromkeys(out) if not words & set(p.lower().split())]


@dataclasses.dataclass
class States:
    """The text states of one solve: erased (n, D) with their guides (n, D), preserved (m, D)."""

    erased: torch.Tensor
    guides: torch.Tensor
    preserved: torch.Tensor
    kept: list[str]  # the preserved concepts' words
    prompts: list[tuple[str, str]]  # (prompt, guide) per edited prompt


def solve_states(pipe: Any, concepts: Sequence[Concept], config: UceConfig) -> States:
    """Every erased, guide and preserved state of `concepts`' edit, the encoder run once."""
    plans = []  # (prompt, guide, words, anchor) per edited prompt
    for concept in concepts:
        anchor = concept.anchor if concept.anchor is not None else (
            config.style_anchor if concept.category == "style" else config.anchor)
        _check_words(pipe, concept.words, "concept")
        _check_words(pipe, anchor, "anchor")
        plans.append((concept.words, anchor, concept.words, anchor))
        if config.expand_prompts:
            plans += [(t.format(concept.words), t.format(anchor).strip(), concept.words, anchor)
                      for t in concept.templates]
    kept = _preserved(config, concepts)
    templates = list(dict.fromkeys(t for c in concepts for t in c.templates))
    in_context = [(t.format(w), w) for w in kept for t in templates] \
        if config.preserve_in_context else []
    encoded = Encoded(pipe)  # every prompt encoded once, in batches
    encoded.prefetch([x for plan in plans for x in plan[:2]] + kept + [p for p, _ in in_context])
    erased, guides = [], []
    for prompt, guide, words, anchor in plans:
        if config.states == "tail":
            own, target = tail_states(pipe, prompt, guide, words, anchor, encoded)
            erased += list(own)
            guides += list(target)
        else:
            erased.append(text_state(pipe, prompt, encoded))
            guides.append(text_state(pipe, guide, encoded))
    states = [text_state(pipe, p, encoded) for p in kept]
    for prompt, word in in_context:
        if config.states == "tail":
            states += list(tail_states(pipe, prompt, prompt, word, word, encoded)[0])
        else:
            states.append(text_state(pipe, prompt, encoded))
    preserved = torch.stack(states) if states else torch.zeros(0, erased[0].shape[0])
    return States(torch.stack(erased), torch.stack(guides), preserved, kept,
                  [(plan[0], plan[1]) for plan in plans])


def edited_layers(pipe: Any, targets: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, module) of every cross-attention projection in `targets`, in UNet order."""
    layers = [(name, module) for name, module in pipe.unet.named_modules()
              if name.endswith(tuple(f"attn2.{t}" for t in targets))]
    if not layers:
        raise FmnError("the UNet has no cross-attention to_k/to_v layers: UCE cannot edit it")
    return layers


def factors_patch(factors: dict[str, dict[str, Any]], metadata: dict[str, Any],
                  config: Any, concepts: Sequence[Concept]) -> Patch:
    """The edit as a LoRA of its exact factors, or as full-weight deltas where its rank would
    reach a layer's width (`config`: any closed form's settings with `output` and `targets`)."""
    rank = next(iter(factors.values()))["A"].shape[0]
    widths = [min(m["B"].shape[0], m["A"].shape[1]) for m in factors.values()]
    as_lora = config.output == "lora" and rank < min(widths)
    tensors: dict[str, torch.Tensor] = {}
    for name, edit in factors.items():
        if as_lora:
            tensors[f"unet.{name}.lora_A.weight"] = edit["A"].contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = edit["B"].contiguous()
        else:
            tensors[f"unet.{name}.weight"] = (edit["B"] @ edit["A"]).contiguous()
    lora_config = ({"r": rank, "lora_alpha": rank, "init_lora_weights": True,
                    "target_modules": [f"attn2.{t}" for t in config.targets]} if as_lora else None)
    metadata = {**metadata, "rank": rank}
    if config.output == "lora" and not as_lora:
        metadata["note"] = f"rank {rank} would reach a weight's width: stored as deltas"
    kind = "lora" if as_lora else "delta"
    return Patch(kind, tensors, metadata, lora_config, run_name(metadata["method"], concepts,
                                                                metadata))


def base_metadata(pipe: Any, concepts: Sequence[Concept], config: UceConfig,
                  kept: list[str], method: str = "uce") -> dict[str, Any]:
    return {
        "method": method,
        "concepts": [x.to_dict() for x in concepts],
        "family": family_of(pipe),
        "base_model_hash": model_hash(pipe),
        "train": "closed form",
        "steps": 0,
        "seed": config.seed,
        "settings": dataclasses.asdict(config),
        "preserved": kept,
    }


def solve_edit(pipe: Any, concepts: Sequence[Concept], config: UceConfig
               ) -> tuple[States, list[tuple[str, Any]], list[dict[str, Any]]]:
    """The states, the edited layers and each layer's low-rank edit of one UCE solve."""
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    states = solve_states(pipe, concepts, config)
    system = System(states.erased, states.guides, states.preserved, config.erase_scale,
                    config.preserve_scale, config.lamb)
    layers = edited_layers(pipe, config.targets)
    return states, layers, [low_rank_edit(module.weight, system) for _, module in layers]


def train(pipe: Any, concepts: Sequence[Concept], config: UceConfig | None = None, *,
          progress: bool = True) -> Patch:
    """Edit `pipe`'s cross-attention so `concepts` map to their anchors; return the patch."""
    concepts, config = list(concepts), config or UceConfig()
    started = time.perf_counter()
    states, layers, edits = solve_edit(pipe, concepts, config)
    factors = {name: edit for (name, _), edit in zip(layers, edits, strict=True)}
    metadata = {
        **base_metadata(pipe, concepts, config, states.kept),
        "edited_states": states.erased.shape[0],
        "reconstruction_error": max(m["error"] for m in factors.values()),
        "condition_number": max(m["condition"] for m in factors.values()),
        "versions": library_versions(),
        "losses": [0.0],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return factors_patch(factors, metadata, config, concepts)
