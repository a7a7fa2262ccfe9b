"""The base text encoder (E): the concept's own prompts through the base model's text
encoder(s) into the patched UNet. White-box and free: on Stable Diffusion the text encoder is
public CLIP, so a forgetting that lives only in the text side is undone by loading the original.
Without patches the model under test is the base model, and E is its G.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forget_me_not.attacks.base import Attack, AttackSettings, Attempt


def encoder_view(patch: Any) -> Any | None:
    """The patch as the base text encoder sees it: its UNet part alone (None: it has none)."""
    from forget_me_not.patch import Patch
    from forget_me_not.patch.keys import is_row_key

    if patch.kind == "embedding":
        return None
    kept = {k: v for k, v in patch.tensors.items() if not is_row_key(k)}
    return Patch(patch.kind, kept, dict(patch.metadata), patch.lora_config,
                 f"{patch.name}_unet")


def run(pipe: Any, patches: Sequence[Any], concept: Any, judge: Any, settings: AttackSettings,
        *, base: Any = None, progress: bool = False) -> Attempt:
    from forget_me_not.evaluate import applied
    from forget_me_not.sampling import recognition_score

    unet_parts = [v for v in (encoder_view(p) for p in patches) if v is not None]
    prompts = list(concept.prompts())
    with applied(pipe, unet_parts):
        score = recognition_score(pipe, concept, judge, prompts, settings.generation(),
                                  desc=f"E {concept.name}", progress=progress)
    return Attempt("encoder", score, prompts, {"unet_parts": len(unet_parts)})


ATTACK = Attack("encoder", "E", "the base model's text encoder(s) with the patched UNet", run)
