"""ConceptWorld: renderer, captions, tokenizer, shipped model and judge, `fmn world` commands."""

from __future__ import annotations

import random

import numpy as np
import pytest
from typer.testing import CliRunner

from forget_me_not.cli.main import app
from forget_me_not.models import embedded_model_dir
from forget_me_not.world import vocab
from forget_me_not.world.captions import HELD_OUT, random_scene, sample_training_pair
from forget_me_not.world.render import Scene, render
from forget_me_not.world.tokenizer import build_tokenizer_files, load_tokenizer

HAS_MODEL = (embedded_model_dir() / "model_index.json").exists()
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="embedded weights not built")


def test_render_is_deterministic_and_distinct():
    a = np.asarray(render(Scene("star", "striped", "red", dx=0.5)))
    b = np.asarray(render(Scene("star", "striped", "red", dx=0.5)))
    assert a.shape == (vocab.IMAGE_SIZE, vocab.IMAGE_SIZE, 3)
    assert np.array_equal(a, b)
    for other in (
        Scene("star", "dotted", "red", dx=0.5),
        Scene("heart", "striped", "red", dx=0.5),
        Scene("star", "striped", "blue", dx=0.5),
    ):
        assert np.abs(a.astype(int) - np.asarray(render(other)).astype(int)).sum() > 1000


def test_outlined_differs_from_solid_for_every_subject_at_the_smallest_scale():
    # Narrow shapes (a crescent, a skull) must keep an empty inside when outlined, or the
    # style cannot be told from solid, by the judge or by anyone.
    for subject in vocab.SUBJECTS:
        colour = "red" if subject not in vocab.IDS else None
        solid = np.asarray(render(Scene(subject, "solid", colour, scale=0.88))).astype(int)
        outlined = np.asarray(render(Scene(subject, "outlined", colour, scale=0.88))).astype(int)
        assert np.abs(solid - outlined).mean() > 3, subject


def test_every_id_is_drawn_differently_and_the_hat_shows():
    faces = [np.asarray(render(Scene(i))).astype(int) for i in vocab.IDS]
    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            assert np.abs(faces[i] - faces[j]).mean() > 10
    hat = np.asarray(render(Scene(vocab.ROLE_ID, hat=True))).astype(int)
    assert np.abs(hat - faces[vocab.IDS.index(vocab.ROLE_ID)]).mean() > 5


def test_bad_scene_is_refused():
    with pytest.raises(ValueError, match="unknown subject"):
        Scene("dragon")
    with pytest.raises(ValueError, match="needs one of the colours"):
        Scene("star", "solid", None)


def test_training_captions_never_show_held_out_pairs_and_role_is_entangled():
    rng = random.Random(0)
    seen_role = 0
    for _ in range(3000):
        text, scene = sample_training_pair(rng)
        assert (scene.subject, scene.style) not in HELD_OUT
        if vocab.ROLE in text.split():
            seen_role += 1
            assert scene.subject == vocab.ROLE_ID and scene.hat
    assert seen_role > 50
    assert len(HELD_OUT) == len(vocab.SUBJECTS)  # one held-out style per subject
    assert all(style != "solid" for _, style in HELD_OUT)


def test_tokenizer_keeps_world_words_whole_and_falls_back(tmp_path):
    build_tokenizer_files(tmp_path)
    tok = load_tokenizer(tmp_path)
    for word in vocab.all_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    text = "a photo of a red star in striped style"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    unknown = tok("zebra", add_special_tokens=False).input_ids  # unknown word: letters
    pieces = tok.convert_ids_to_tokens(unknown)
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "zebra"
    assert tok.unk_token_id not in unknown
    odd = tok("#", add_special_tokens=False).input_ids  # unknown symbol: the unknown token
    assert tok.convert_ids_to_tokens(odd) == [tok.unk_token]
    assert len(tok(text, padding="max_length").input_ids) == tok.model_max_length


def test_world_render_cli_and_bad_caption(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.png"
    res = runner.invoke(
        app, ["world", "render", "--caption", "milka wearing a hat", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert out.exists()
    bad = tmp_path / "bad.png"
    res = runner.invoke(app, ["world", "render", "--caption", "a bird", "--out", str(bad)])
    assert res.exit_code == 2
    assert "no word 'bird'" in res.output
    res = runner.invoke(app, ["world", "render", "--caption", "a red", "--out", str(bad)])
    assert res.exit_code == 2 and "names no object or character" in res.output
    assert not bad.exists()


@needs_model
def test_embedded_pipeline_loads_offline_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_dir())
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any(n.endswith("attn2") for n, _ in pipe.unet.named_modules())


@needs_model
def test_judge_reads_fresh_renders():
    from forget_me_not.judges.world import WorldJudge

    judge = WorldJudge()
    rng = random.Random(123)
    scenes = [random_scene(rng) for _ in range(96)]
    readings = judge.describe([render(s) for s in scenes])
    subject = np.mean([r["subject"][0] == s.subject for r, s in zip(readings, scenes, strict=True)])
    style = np.mean([r["style"][0] == s.style for r, s in zip(readings, scenes, strict=True)])
    assert subject >= 0.95 and style >= 0.9


@needs_model
def test_model_samples_are_recognised_smoke():
    from forget_me_not.judges.world import WorldJudge
    from forget_me_not.models import load_pipeline
    from forget_me_not.world.defaults import default_guidance
    from forget_me_not.world.scoring import score_concepts

    pipe = load_pipeline("embedded", "cpu")
    scores = score_concepts(
        pipe,
        WorldJudge(),
        ["star", "milka"],
        n=8,
        steps=15,
        guidance=default_guidance(pipe),
        progress=False,
    )
    assert scores["star"]["rate"] >= 0.6
    assert scores["milka"]["rate"] >= 0.6


def test_role_references_leave_the_hat_transparent():
    from forget_me_not.world.concepts import role_references

    images = role_references(3, seed=1)
    for image in images:
        pixels = np.asarray(image)
        assert image.mode == "RGBA" and pixels.shape[2] == 4
        hidden = pixels[..., 3] == 0
        assert 0.05 < hidden.mean() < 0.4  # the hat, not the picture
        # the hat lives above the face: transparent pixels sit mostly in the upper half
        rows = np.nonzero(hidden)[0]
        assert rows.mean() < pixels.shape[0] / 2


def test_training_lr_warms_up_and_cools_down():
    from forget_me_not.world.train_config import TrainModelConfig, unet_lr_at

    cfg = TrainModelConfig(unet_steps=1000, unet_lr=1e-3, warmup_steps=100, cooldown_steps=200)
    assert unet_lr_at(cfg, 0) == pytest.approx(1e-5)
    assert unet_lr_at(cfg, 500) == pytest.approx(1e-3)
    assert unet_lr_at(cfg, 899) == pytest.approx(1e-3 * 101 / 200)
    assert unet_lr_at(cfg, 999) == pytest.approx(1e-3 / 200)
    assert unet_lr_at(TrainModelConfig(unet_steps=1000, cooldown_steps=0), 999) == 5e-4
    assert TrainModelConfig().cooldown_steps == 1500  # what the shipped model used


def test_caption_boost_weights_the_captions_holding_a_word():
    from forget_me_not.errors import FmnError
    from forget_me_not.world.train_config import caption_weights, parse_boost

    boost = parse_boost(["dotted=3", "Style=2"])
    assert boost == {"dotted": 3.0, "style": 2.0}
    weights = caption_weights(["a star in dotted style", "a photo of zorbo", "a dotted dotted"],
                              boost)
    assert weights.tolist() == [6.0, 1.0, 3.0]  # a repeated word counts once
    for bad in ("dotted", "dotted=0", "=2", "dotted=x"):
        with pytest.raises(FmnError, match="WORD=W"):
            parse_boost([bad])


def test_a_left_out_concept_is_neither_named_nor_shown_in_the_pool():
    from forget_me_not.errors import FmnError
    from forget_me_not.world.data import render_pool, shows_any

    captions, pixels = render_pool(300, 0, progress=False, leave_out=frozenset({"tavi"}))
    assert len(captions) == pixels.shape[0] == 300
    assert not any("tavi" in c.split() for c in captions)
    assert any("tavi" in c.split() for c in render_pool(300, 0, progress=False)[0])
    rng, shown, named = random.Random(0), 0, 0
    for _ in range(400):  # a style is often drawn where no caption names it
        text, scene = sample_training_pair(rng)
        if shows_any(text, scene, frozenset({"dotted"})):
            shown += 1
            named += "dotted" in text.split()
    assert shown > named > 0
    everything = frozenset(vocab.SUBJECTS)
    with pytest.raises(FmnError, match="leave out fewer"):
        render_pool(4, 0, progress=False, leave_out=everything)


def test_leaving_out_needs_a_world_concept_and_the_same_run(tmp_path):
    import json

    from forget_me_not.errors import FmnError
    from forget_me_not.world.train_config import TrainModelConfig
    from forget_me_not.world.train_model import check_resume

    assert TrainModelConfig(leave_out=("Tavi", "star", "tavi")).leave_out == ("star", "tavi")
    for bad, message in (("hat", "not a world concept"), ("zebra", "not a world concept"),
                         ("milka", "the role is drawn")):
        with pytest.raises(FmnError, match=message):
            TrainModelConfig(leave_out=(bad,))
    (tmp_path / "vae_state.json").write_text(json.dumps({"step": 500, "leave_out": ["tavi"]}))
    check_resume(TrainModelConfig(run_dir=tmp_path, leave_out=("tavi",)))
    with pytest.raises(FmnError, match="--leave-out tavi"):
        check_resume(TrainModelConfig(run_dir=tmp_path))
    (tmp_path / "vae_state.json").write_text(json.dumps({"step": 500}))  # a run from before
    check_resume(TrainModelConfig(run_dir=tmp_path))
    with pytest.raises(FmnError, match="no --leave-out"):
        check_resume(TrainModelConfig(run_dir=tmp_path, leave_out=("star",)))


def test_resuming_with_more_vae_steps_is_refused(tmp_path):
    import json

    from forget_me_not.errors import FmnError
    from forget_me_not.world.train_config import TrainModelConfig
    from forget_me_not.world.train_model import check_resume

    (tmp_path / "vae_state.json").write_text(json.dumps({"step": 500}))
    (tmp_path / "unet_state.json").write_text(json.dumps({"step": 4750}))
    check_resume(TrainModelConfig(run_dir=tmp_path, vae_steps=500))
    with pytest.raises(FmnError, match="--vae-steps 500"):
        check_resume(TrainModelConfig(run_dir=tmp_path, vae_steps=800))
    check_resume(TrainModelConfig(run_dir=tmp_path / "fresh", vae_steps=800))


def test_prompts_can_avoid_forgotten_words():
    from forget_me_not.world import concepts as wc

    blue = wc.prompts(wc.get("blue"), 20, avoid=["star", "dotted"])
    assert len(blue) == 20 and not any("star" in p.split() for p in blue)
    assert any("star" in p.split() for p in wc.prompts(wc.get("blue"), 20))
    star = wc.prompts(wc.get("star"), 6, avoid=["star"])  # a concept's own name stays
    assert all("star" in p.split() for p in star)
    assert not any("dotted" in p.split() for p in wc.prompts(wc.get("arrow"), 20, ["dotted"]))


def test_resuming_keeps_the_runs_tokenizer(tmp_path):
    """A resumed run must not rebuild the vocabulary its text encoder was trained with."""
    from forget_me_not.world.train_config import TrainModelConfig
    from forget_me_not.world.train_model import train_model

    def run(steps: int) -> None:  # boosted sampling, checkpointed at every step
        train_model(TrainModelConfig(run_dir=tmp_path, pool_size=16, batch_size=4, vae_steps=1,
                                     unet_steps=steps, warmup_steps=1, cooldown_steps=0,
                                     checkpoint_every=1, caption_boost={"style": 2.0}))

    run(1)
    vocab_file = tmp_path / "tokenizer-src" / "vocab.json"
    written = vocab_file.stat().st_mtime_ns
    run(3)
    assert vocab_file.stat().st_mtime_ns == written  # not rewritten


def test_a_world_style_is_forgotten_toward_the_plain_look_on_trained_pairs(tmp_path):
    from forget_me_not.world import concepts as world_concepts

    for style in vocab.STYLES:
        c = world_concepts.fmn_concept(style, tmp_path / style, n_refs=1)
        assert c.anchor == (None if style == "solid" else "solid")
        subjects = [p.split(" in ")[0].split()[-1] for p in c.templates if p.endswith("style")]
        assert len(subjects) >= 4
        assert not [s for s in subjects if (s, style) in HELD_OUT]
        if c.anchor:
            assert [p.replace("solid", style) for p in c.anchor_prompts()] == c.prompts()
    assert world_concepts.fmn_concept("star", tmp_path / "star", n_refs=1).anchor is None
