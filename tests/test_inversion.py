"""Textual inversion: new tokens only, norm decay, save/load, and re-steering onto them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forget_me_not.api import invert
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.inversion import load_embedding
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_only_new_rows_train_and_decay_toward_target(family, image_dir):
    pipe = make_tiny_pipeline(family)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]
    before = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    emb = invert(pipe, image_dir, num_tokens=2, init_words="star", steps=3, seed=0,
                 progress=False)
    assert emb.tokens == ["<c0>", "<c1>"] and emb.phrase == "<c0> <c1>"
    assert len(emb.vectors) == len(encoders)
    star = pipe.tokenizer("star", add_special_tokens=False)["input_ids"][0]
    for enc, old, vec in zip(encoders, before, emb.vectors, strict=True):
        table = enc.get_input_embeddings().weight
        assert table.shape[0] == old.shape[0] + 2
        assert torch.equal(table[: old.shape[0]], old)  # every old row untouched
        assert vec.shape == (2, old.shape[1])
        assert not torch.equal(vec[0], old[star])  # started at "star", then moved
        # Norm decay: each step moves the norm 10% of the way to 0.4 (lr 1e-3).
        start = old[star].norm().item()
        assert abs(vec[0].norm().item() - 0.4) < abs(start - 0.4)
    assert len(emb.metadata["losses"]) == 3 and emb.metadata["family"] == family


def test_save_load_into_fresh_pipeline_and_resteer(tmp_path, image_dir):
    pipe = make_tiny_pipeline("sd1")
    emb = invert(pipe, image_dir, num_tokens=2, init_words="star", steps=2, progress=False)
    path = emb.save(tmp_path / "emb.safetensors")
    loaded = load_embedding(path)
    assert loaded.tokens == emb.tokens
    assert torch.equal(loaded.vectors[0], emb.vectors[0])

    fresh = make_tiny_pipeline("sd1")
    phrase = loaded.load_into(fresh)
    assert phrase == "<c0> <c1>"
    ids = fresh.tokenizer(phrase, add_special_tokens=False)["input_ids"]
    table = fresh.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], emb.vectors[0])
    with pytest.raises(FmnError, match="already has"):
        loaded.load_into(fresh)

    concept = Concept("my thing", token_words=phrase, images=tuple(image_dir.iterdir()))
    patch = train_any(fresh, [concept], fmn_config(steps=2, reference="images"),
                    progress=False)
    assert patch.metadata["concepts"][0]["token_words"] == "<c0> <c1>"
    with pytest.raises(FmnError, match="text encoder"):
        loaded.load_into(make_tiny_pipeline("sdxl"))


def test_in_memory_images(image_dir):
    images = [Image.open(p) for p in sorted(image_dir.iterdir())]
    emb = invert(make_tiny_pipeline("sd1"), images, num_tokens=1, steps=1, progress=False)
    assert emb.tokens == ["<c0>"]
    with pytest.raises(FmnError, match="smaller than"):
        invert(make_tiny_pipeline("sd1"), [Image.new("RGB", (8, 8))], steps=1, progress=False)


def test_bad_inputs(tmp_path, image_dir):
    pipe = make_tiny_pipeline("sd1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FmnError, match="empty"):
        invert(pipe, empty, steps=1, progress=False)
    (image_dir / "notes.txt").write_text("hello")
    with pytest.raises(FmnError, match="notes.txt"):
        invert(pipe, image_dir, steps=1, progress=False)
    with pytest.raises(FmnError):
        invert(pipe, tmp_path, num_tokens=0, steps=1, progress=False)
