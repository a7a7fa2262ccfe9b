"""Correction (role away from an entangled identity) and the retention regulariser."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from forget_me_not.cli.main import app
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.judges.base import BaseJudge
from forget_me_not.methods.correction.config import CorrectionConfig
from forget_me_not.methods.correction.train import correct
from forget_me_not.methods.fmn.loop import Run
from forget_me_not.methods.fmn.terms import Preserve
from forget_me_not.patch import load_patch
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any

runner = CliRunner()


def _cfg(**kw):
    return fmn_config(**{"steps": 2, "reference": "noise", "lr": 1e-2, **kw})


# -- retention regulariser ----------------------------------------------------------------------


def test_preserve_config_validation():
    assert fmn_config().preserve_weight == 0.0
    assert fmn_config().preserve_prompts == ()
    from forget_me_not.methods.fmn.loop import resolve

    with pytest.raises(FmnError, match="preserve_prompts"):
        resolve(fmn_config(preserve_weight=0.5), [Concept("star")])
    # A shipped prompt set fills the prompts in, the targets' words left out.
    world = resolve(fmn_config(preserve_weight=30.0, preserve_set="conceptworld"),
                    [Concept("star")])
    assert world.preserve_prompts and not any("star" in p for p in world.preserve_prompts)
    with pytest.raises(FmnError, match="preserve_weight"):
        fmn_config(preserve_weight=-1.0, preserve_prompts=("a cat",))
    with pytest.raises(FmnError, match="empty"):
        fmn_config(preserve_weight=1.0, preserve_prompts=(" ",))


@pytest.mark.parametrize("train", ["lora", "xattn"])
def test_preserve_term_is_in_the_loss_and_pipeline_comes_back(train):
    pipe = make_tiny_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    lr = 1e-2 if train == "lora" else 1e-3
    cfg = _cfg(train=train, lr=lr, preserve_weight=10.0, preserve_prompts=("a photo of a moon",))
    patch = train_any(pipe, [Concept("star")], cfg, progress=False)
    kept = patch.metadata["term_losses"]["preserve"]
    assert len(kept) == 2 and all(np.isfinite(kept))
    assert kept[-1] > 0  # after one step the delta moves the preserved prompt's prediction
    assert patch.metadata["settings"]["preserve_weight"] == 10.0
    after = dict(pipe.unet.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_preserve_weight_zero_is_exactly_the_old_behaviour():
    plain = train_any(make_tiny_pipeline("sd1"), [Concept("star")], _cfg(), progress=False)
    zero = train_any(make_tiny_pipeline("sd1"), [Concept("star")],
                   _cfg(preserve_weight=0.0, preserve_prompts=("a photo of a moon",)),
                   progress=False)
    assert plain.tensors.keys() == zero.tensors.keys()
    assert all(torch.equal(plain.tensors[k], zero.tensors[k]) for k in plain.tensors)
    assert plain.metadata["losses"] == zero.metadata["losses"]
    assert "preserve" not in zero.metadata["term_losses"]


def test_preserve_latents_own_draws_one_latent_per_prompt_and_changes_the_run():

    with pytest.raises(FmnError, match="preserve_latents"):
        fmn_config(preserve_latents="mine")
    assert fmn_config().preserve_latents == "shared"
    prompts = ("a photo of a moon", "a photo of a sun", "a cat")
    cfg = _cfg(preserve_weight=10.0, preserve_prompts=prompts, preserve_latents="own",
               preserve_steps=2)
    pipe = make_tiny_pipeline("sd1")
    run = Run(pipe, cfg, None, torch.Generator())
    own = Preserve(run, prompts).latents
    assert own.shape == (3, 4, 8, 8)
    assert torch.equal(own, Preserve(run, prompts).latents)  # seeded
    assert not torch.equal(own[0], own[1])  # each prompt draws its own image
    shared = Run(pipe, replace(cfg, preserve_latents="shared"), None, torch.Generator())
    assert Preserve(shared, prompts).latents is None
    runs = {
        mode: train_any(make_tiny_pipeline("sd1"), [Concept("star")],
                      _cfg(preserve_weight=10.0, preserve_prompts=prompts, preserve_steps=2,
                           preserve_latents=mode), progress=False)
        for mode in ("shared", "own")
    }
    # Same target loss at the first step (same draws); the preserve term sees other latents.
    assert runs["own"].metadata["settings"]["preserve_latents"] == "own"
    own, shared = (runs[m].metadata["term_losses"]["preserve"] for m in ("own", "shared"))
    assert own != shared


def test_preserve_t_min_draws_the_regulariser_timesteps_apart():
    with pytest.raises(FmnError, match="preserve_t_min"):
        fmn_config(preserve_t_min=-1)
    assert fmn_config().preserve_t_min == 0
    prompts = ("a photo of a moon", "a cat")

    def run(t_min, latents="own"):
        cfg = _cfg(preserve_weight=10.0, preserve_prompts=prompts, preserve_steps=2,
                   preserve_latents=latents, preserve_t_min=t_min)
        return train_any(make_tiny_pipeline("sd1"), [Concept("star")], cfg, progress=False)

    plain, high = run(0), run(900)
    assert high.metadata["settings"]["preserve_t_min"] == 900
    assert plain.metadata["term_losses"]["preserve"] != high.metadata["term_losses"]["preserve"]
    # With "shared" latents the regulariser must use the concept's noisy latent and its t.
    assert run(0, "shared").metadata["losses"] == run(900, "shared").metadata["losses"]


def test_text_keep_shrinks_what_the_lora_does_to_the_kept_prompts_states():
    from forget_me_not.pipeline_io import encode_prompt

    with pytest.raises(FmnError, match="text_keep_weight"):
        fmn_config(text_keep_weight=-1.0)
    assert fmn_config().text_keep_weight == 0.0
    prompt = "a photo of a moon"

    def moved(weight):
        pipe = make_tiny_pipeline("sd1")
        cfg = _cfg(steps=4, lr=3e-2, preserve_weight=1.0, preserve_prompts=(prompt,),
                   text_keep_weight=weight)
        patch = train_any(pipe, [Concept("star")], cfg, progress=False)
        assert len(patch.metadata["term_losses"]["text_keep"]) == 4
        states = encode_prompt(pipe, prompt)[0][0].detach()  # (T, D)
        total = 0.0
        for module, (a, b) in patch.lora_pairs().items():
            if module.endswith(("to_k", "to_v")):
                total += float((states @ (b @ a).T * patch.lora_scaling).pow(2).sum())
        return total

    assert moved(1e6) < 0.5 * moved(1e-9)


def _prediction_gap(pipe, patch, patched_prompt: str, base_prompt: str, seed: int) -> float:
    """Mean squared gap between the patched UNet on `patched_prompt` and the base UNet on
    `base_prompt`, on fixed noisy latents at four timesteps (applies the patch)."""
    from forget_me_not.pipeline_io import encode_prompt

    patched, _ = encode_prompt(pipe, patched_prompt)
    base, _ = encode_prompt(pipe, base_prompt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 300, 600, 900])
    with torch.no_grad():
        target = pipe.unet(x, t, encoder_hidden_states=base.expand(4, -1, -1)).sample
        patch.apply(pipe)
        moved = pipe.unet(x, t, encoder_hidden_states=patched.expand(4, -1, -1)).sample
    return float((moved - target).pow(2).mean())


def test_anchor_term_validation_and_pull_toward_the_anchor():
    with pytest.raises(FmnError, match="--toward PROMPT"):
        fmn_config(anchor_weight=1.0)
    with pytest.raises(FmnError, match="anchor_weight"):
        fmn_config(anchor_weight=-1.0, anchor_prompts=("a cat",))
    with pytest.raises(FmnError, match="anchor prompt is empty"):
        fmn_config(anchor_weight=1.0, anchor_prompts=("",))
    off = train_any(make_tiny_pipeline("sd1"), [Concept("star")], _cfg(), progress=False)
    assert "anchor" not in off.metadata["term_losses"]

    def gap(weight):
        # How far "a photo of a star" is from the anchor's base prediction after training.
        pipe = make_tiny_pipeline("sd1")
        anchor = "a photo of a moon"
        cfg = _cfg(steps=6, lr=3e-2, preserve_steps=2, anchor_weight=weight,
                   anchor_prompts=(anchor,) if weight else ())
        patch = train_any(pipe, [Concept("star")], cfg, progress=False)
        if weight:
            assert len(patch.metadata["term_losses"]["anchor"]) == 6
        return _prediction_gap(pipe, patch, "a photo of a star", anchor, seed=5)

    assert gap(100.0) < gap(0.0)


def test_concept_anchor_pulls_each_prompt_toward_its_own_anchor_prompt():
    with pytest.raises(FmnError, match="anchor is empty"):
        Concept("star", anchor=" ")
    with pytest.raises(FmnError, match="concept_anchor_weight"):
        fmn_config(concept_anchor_weight=-1.0)
    styled = Concept("dotted", "style", ("a photo in the style of {}", "a {} cat"), anchor="plain")
    assert styled.anchor_prompts() == ["a photo in the style of plain", "a plain cat"]
    assert Concept("star").anchor_prompts() == [] and styled.to_dict()["anchor"] == "plain"

    def gap(anchor, weight=100.0):
        pipe = make_tiny_pipeline("sd1")
        concepts = [Concept("star", templates=("a photo of a {}",), anchor=anchor),
                    Concept("cat", templates=("a {}",))]  # no anchor: no pull for its rows
        cfg = _cfg(steps=6, lr=3e-2, preserve_steps=2, concept_anchor_weight=weight)
        patch = train_any(pipe, concepts, cfg, progress=False)
        if anchor and weight:  # rows alternate star, cat: three steps pull star
            assert len(patch.metadata["term_losses"]["concept_anchor"]) == 3
            assert patch.metadata["concepts"][0]["anchor"] == anchor
        else:
            assert "concept_anchor" not in patch.metadata["term_losses"]
        return _prediction_gap(pipe, patch, "a photo of a star", "a photo of a moon", seed=5)

    assert gap("moon") < gap(None)
    assert gap("moon", weight=0.0) == pytest.approx(gap(None))


def test_preserve_keeps_the_preserved_prompt_closer_to_the_base():
    def drift(weight):
        pipe = make_tiny_pipeline("sd1")
        prompt = "a photo of a moon"
        cfg = _cfg(steps=4, lr=3e-2, preserve_weight=weight,
                   preserve_prompts=(prompt,) if weight else ())
        patch = train_any(pipe, [Concept("star")], cfg, progress=False)
        return _prediction_gap(pipe, patch, prompt, prompt, seed=3)

    assert drift(1000.0) < drift(0.0)


# -- correction ---------------------------------------------------------------------------------


class FixedJudge(BaseJudge):
    """Says every image shows the concept with a fixed probability."""

    name = "fixed"

    def __init__(self, p):
        super().__init__()
        self.p = p

    def probabilities(self, images, concept):
        return np.full(len(images), self.p)


def _refs(tmp_path):
    from PIL import Image

    folder = tmp_path / "milka"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return tuple(sorted(folder.iterdir()))


def test_correct_measures_warns_and_preserves_the_identity(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    role, ident = Concept("wizard", "id"), Concept("milka", "id")
    refs = _refs(tmp_path)
    with pytest.warns(UserWarning, match=r"only 0% of 2 samples of 'wizard' show 'milka'"):
        low = correct(pipe, role, ident, CorrectionConfig(variant="resteer", n_check=2,
                                                          step_factor=1),
                      fmn_config(steps=1), images=refs, judge=FixedJudge(0.1), progress=False)
    assert low.rate_before == 0.0
    high = correct(pipe, role, ident, CorrectionConfig(variant="resteer", n_check=2,
                                                       step_factor=1),
                   fmn_config(steps=2), images=refs, judge=FixedJudge(0.9), progress=False)
    assert high.rate_before == 1.0 and high.reference_source == "images"
    meta = high.patch.metadata
    assert meta["concepts"][0]["name"] == "wizard"
    assert meta["correction"]["away_from"]["name"] == "milka"
    assert meta["settings"]["preserve_weight"] == CorrectionConfig().preserve_weight
    assert list(meta["settings"]["preserve_prompts"]) == ["a photo of milka"]
    assert len(meta["term_losses"]["preserve"]) == 2
    with pytest.raises(FmnError, match="same words"):
        correct(pipe, role, Concept("wizard"), images=refs, progress=False)


def test_correct_without_images_draws_the_identity_itself(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    result = correct(pipe, Concept("wizard", "id"), Concept("milka", "id"),
                     CorrectionConfig(variant="resteer", preserve_weight=0.0, step_factor=1),
                     fmn_config(steps=1), progress=False)
    assert result.reference_source == "self" and result.rate_before is None
    assert "preserve" not in result.patch.metadata["term_losses"]


def _correct(model, out, *extra):
    return runner.invoke(app, ["correct", "--model", str(model), "--concept", "wizard",
                               "--away-from", "milka", "--steps", "2", "--device", "cpu",
                               "--out", str(out), *extra])


def test_cli_correct_on_the_embedded_model_uses_world_renders(world_dir, tmp_path, monkeypatch):
    import forget_me_not.cli.correct as cli

    monkeypatch.setattr(cli, "_judge", lambda *a: FixedJudge(0.1))
    out = tmp_path / "fix.safetensors"
    result = _correct(world_dir, out, "--set", "n_check=2", "--method", "resteer")
    assert result.exit_code == 0, result.output
    assert "warning: only 0% of 2 samples" in result.stderr
    meta = load_patch(out).metadata
    assert meta["correction"]["reference_source"] == "world renders, hat kept"
    # world phrasing for both: the role's templates and the identity's preserved prompts
    assert meta["concepts"][0]["templates"] == ["a {}", "a photo of a {}", "a portrait of a {}"]
    assert meta["settings"]["preserve_prompts"] == ["a photo of milka", "a portrait of milka"]
    # pulled toward the hat on the other IDs, without the transparent-pixel hold
    anchors = meta["correction"]["anchor_prompts"]
    assert "zorbo wearing a hat" in anchors and not any("milka" in a for a in anchors)
    assert meta["settings"]["anchor_weight"] == CorrectionConfig().anchor_weight
    assert meta["settings"]["transparent_weight"] == 0.0
    assert len(meta["term_losses"]["anchor"]) == 2  # --steps 2 kept (default: twice the family's)
    off = _correct(world_dir, tmp_path / "off.safetensors", "--set", "n_check=0", "--set",
                   "anchor_weight=0",
                   "--method", "resteer")
    assert off.exit_code == 0, off.output
    meta = load_patch(tmp_path / "off.safetensors").metadata
    assert meta["settings"]["anchor_weight"] == 0.0 and "anchor" not in meta["term_losses"]


def test_cli_correct_bad_input(tiny_pipeline_dir, tmp_path):
    sd1 = tiny_pipeline_dir("sd1")
    for extra, fragment in ((["--set", "n_check=-1"], "n_check"),
                            (["--set", "preserve_weight=-1"], "preserve_weight"),
                            (["--set", "anchor_weight=-1"], "anchor_weight"),
                            (["--set", "magic=1"], "valid keys"),
                            (["--toward", " "], "prompt is empty"),
                            (["--judge-model", str(tmp_path / "none")], "not a folder"),
                            (["--method", "magic"], "variant"),
                            ([], "--toward PROMPT"),
                            (["--out", str(tmp_path / "p.bin")], ".safetensors")):
        result = _correct(sd1, tmp_path / "p.safetensors", *extra)
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
