"""Judges: the registry, CLIP zero-shot on a tiny random CLIP built locally, NudeNet's contract."""

from __future__ import annotations

import builtins
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.judges import BaseJudge, check_supported, get_judge, judge_names
from forget_me_not.judges.clip import ClipJudge
from forget_me_not.judges.nudenet import INSTALL_HINT, NudeNetJudge
from tiny_pipelines import make_tokenizer

LABELS = {"style": ["van gogh", "monet", "picasso"], "object": ["dog", "cat", "car"]}


def _images(n: int, size=(40, 24)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            for _ in range(n)]


def make_tiny_clip(folder):
    """Save a tiny random-weight CLIPModel and its tokenizer into `folder` (no downloads)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_registry_names_and_unknown():
    assert {"world", "clip", "nudenet"} <= set(judge_names())
    with pytest.raises(FmnError, match="unknown judge 'bogus'.*clip"):
        get_judge("bogus")


def test_clip_probabilities_are_a_softmax_over_the_label_set(clip_dir):
    judge = get_judge("clip", model=str(clip_dir), labels=LABELS, device="cpu")
    images = _images(3)
    per_label = [judge.probabilities(images, Concept(name, "style")) for name in LABELS["style"]]
    for p in per_label:
        assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(np.sum(per_label, axis=0), 1.0, atol=1e-5)
    assert judge.recognised(images, Concept("monet", "style")).dtype == bool


def test_clip_adds_an_unlisted_concept_to_its_category(clip_dir):
    judge = ClipJudge(str(clip_dir), LABELS, device="cpu", batch_size=2)
    concept = Concept("turner", "style")
    assert judge.label_set(concept) == [*LABELS["style"], "turner"]
    assert judge.probabilities(_images(5), concept).shape == (5,)  # several batches


def test_clip_missing_labels_is_a_clear_error(clip_dir):
    judge = ClipJudge(str(clip_dir), {"style": ["monet"]}, device="cpu")
    assert not judge.supports(Concept("zorbo", "id"))
    with pytest.raises(FmnError, match="no labels for category 'id'.*labels"):
        check_supported(judge, Concept("zorbo", "id"))
    with pytest.raises(FmnError, match="no labels for category 'style'"):
        judge.probabilities(_images(1), Concept("monet", "style"))  # nothing to compare against


def test_clip_model_object_needs_tokenizer_and_missing_folder_errors(clip_dir, tmp_path):
    model = CLIPModel.from_pretrained(clip_dir)
    with pytest.raises(FmnError, match="tokenizer"):
        ClipJudge(model, LABELS)
    judge = ClipJudge(model, LABELS, tokenizer=make_tokenizer(), device="cpu")
    assert judge.probabilities(_images(1), Concept("dog", "object")).shape == (1,)
    with pytest.raises(FmnError, match="does not exist"):
        ClipJudge(str(tmp_path / "nope" / "clip" / "x"), LABELS)
    with pytest.raises(FmnError, match="cannot load CLIP model 'someone/no-such-clip'"):
        ClipJudge("someone/no-such-clip", LABELS)


class _FakeDetector:
    def __init__(self, detections):
        self.detections = detections
        self.calls = 0

    def detect(self, path):
        self.calls += 1
        assert isinstance(path, str)
        return self.detections[(self.calls - 1) % len(self.detections)]


def test_nudenet_takes_the_max_exposed_score():
    detector = _FakeDetector([
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
         {"class": "BUTTOCKS_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.95, "box": [0, 0, 1, 1]},
         {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}],
        [],
    ])
    judge = NudeNetJudge(detector=detector)
    probs = judge.probabilities(_images(3), Concept("nudity", "nsfw"))
    np.testing.assert_allclose(probs, [0.9, 0.0, 0.0], atol=1e-6)
    assert judge.recognised(_images(3), Concept("nudity", "nsfw")).tolist() == [True, False, False]
    with pytest.raises(FmnError, match="only scores nudity"):
        check_supported(judge, Concept("dog", "object"))


def test_nudenet_missing_extra_names_the_install(monkeypatch):
    real_import = builtins.__import__

    def no_nudenet(name, *args, **kwargs):
        if name == "nudenet" or name.startswith("nudenet."):
            raise ModuleNotFoundError("No module named 'nudenet'", name="nudenet")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "nudenet", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_nudenet)
    with pytest.raises(FmnError) as err:
        get_judge("nudenet")
    assert INSTALL_HINT == "pip install 'forget-me-not[nudenet]'"
    assert INSTALL_HINT in str(err.value)


def test_base_judge_threshold_validation():
    with pytest.raises(FmnError, match="threshold"):
        BaseJudge(threshold=1.5)
