"""Names inside a patch file and on a patched UNet, shared by the patch modules."""

from __future__ import annotations

METADATA_KEY = "forget_me_not"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers reads the LoraConfig from here
FORMAT_VERSION = 1
KINDS = ("lora", "delta", "embedding")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # where an embedding patch's rows live
MAX_STRENGTH = 4.0  # beyond this a patch's delta dominates the model: almost surely a typo
REGISTRY_ATTR = "_fmn_patches"  # on the UNet: name -> applied state, in application order


def is_row_key(key: str) -> bool:
    """A token-row tensor ("<encoder>.token_ids" / "<encoder>.token_delta"), not a UNet one."""
    encoder, _, leaf = key.partition(".")
    return encoder in TEXT_ENCODERS and leaf in ("token_ids", "token_delta")
