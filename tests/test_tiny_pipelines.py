"""The test fixtures themselves: tokenizer words are single tokens, pipelines reload offline."""

import torch
from diffusers import DiffusionPipeline

from tiny_pipelines import WORDS, make_tokenizer


def test_world_words_are_single_tokens():
    tok = make_tokenizer()
    for word in WORDS:
        assert len(tok.tokenize(word)) == 1, word
    # Unknown words fall back to letters instead of collapsing to <|endoftext|>.
    assert tok.tokenize("xyz") == ["x", "y", "z</w>"]


def test_saved_pipeline_reloads_and_generates(tiny_pipeline_dir, family):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    assert any(name.endswith("attn2") for name, _ in pipe.unet.named_modules())
    out = pipe(
        "a photo of a star",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 16, 16, 3)
