"""The patch: what a method trained, as one safetensors file, applied to and removed from a pipe.

Three kinds:
- "lora": peft LoRA weights in diffusers' key format ("unet.<module>.lora_A.weight"), with the
  LoraConfig in the header under "lora_adapter_metadata", so plain diffusers loads the file
  with `pipe.load_lora_weights(path)`. Applied as a named peft adapter, so several patches
  stack (each its own adapter name and scale).
- "delta": trained-minus-original tensors of full weights ("unet.<param name>"). Applying adds
  them; the originals are kept, so removal is exact.
- "embedding": changes to a few rows of the text encoder(s)' token-embedding table
  ("<encoder>.token_ids" (k,) and "<encoder>.token_delta" (k, dim)). Every prompt without
  those tokens is untouched; applying adds the rows, removal restores them exactly.

A LoRA or delta patch may carry token rows as well (a recipe with a `token_rows` part): the UNet
change and the rows go on and come off together. Such a file is no plain diffusers LoRA any more
(diffusers refuses keys without "lora"); `to_kohya` keeps its UNet half. Our own metadata
(method, recipe, concepts, family, base hash, resolved settings, versions) is JSON in the header
under "forget_me_not".

Modules: `core` (the Patch, load/save, strength), `applying` (on and off a pipeline), `ops`
(stack, unstack, extract, merge), `export` (kohya keys, `describe`).
"""

from forget_me_not.patch.applying import applied_registry, reactivate
from forget_me_not.patch.core import (
    Patch,
    adapter_name,
    check_strength,
    family_of,
    library_versions,
    load_patch,
    model_hash,
    run_name,
)
from forget_me_not.patch.export import describe, kohya_key, save_kohya, to_kohya
from forget_me_not.patch.keys import FORMAT_VERSION, KINDS, METADATA_KEY, TEXT_ENCODERS
from forget_me_not.patch.ops import (
    extract_lora,
    merge_into,
    save_merged,
    stack_patches,
    unstack,
)

__all__ = [
    "FORMAT_VERSION", "KINDS", "METADATA_KEY", "TEXT_ENCODERS", "Patch", "adapter_name",
    "applied_registry", "check_strength", "describe", "extract_lora", "family_of", "kohya_key",
    "library_versions", "load_patch", "merge_into", "model_hash", "reactivate", "run_name",
    "save_kohya", "save_merged", "stack_patches", "to_kohya", "unstack",
]
