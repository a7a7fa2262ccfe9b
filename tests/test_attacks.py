"""The attacks on tiny pipelines: each against a patch that only hides the concept (token rows),
scored by a judge that recognises what the base model draws for the concept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forget_me_not import attacks
from forget_me_not.attacks import AttackSettings
from forget_me_not.attacks.adversarial import search
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.evaluate import applied
from forget_me_not.sampling import recognition_score
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any

STAR = Concept("star", templates=("a photo of a {}", "a {}"))
SETTINGS = AttackSettings(n=4, seed=0, steps=2, batch_size=4, budget=12, max_anchors=2,
                          adversarial_tokens=2)


class BaseLikeJudge:
    """Recognises an image when it is (nearly) one the base model drew for the concept."""

    name, threshold = "base-like", 0.5

    def __init__(self, images: list[Image.Image]) -> None:
        self.base = [np.asarray(im, dtype=np.float32) for im in images]

    def supports(self, concept) -> bool:
        return True

    def probabilities(self, images, concept) -> np.ndarray:
        def near(im) -> float:
            x = np.asarray(im, dtype=np.float32)
            return float(any(np.abs(x - b).mean() < 1.0 for b in self.base))

        return np.array([near(im) for im in images])


@pytest.fixture(scope="module")
def hidden():
    """(pipe, a token-row patch of star, the judge, the base model's star samples)."""
    pipe = make_tiny_pipeline("sd1")
    config = fmn_config(train="tokens", steps=4, reference="noise", lr=0.5)
    patch = train_any(pipe, [STAR], config)
    base = recognition_score(pipe, STAR, BaseLikeJudge([]), STAR.prompts(),
                             SETTINGS.generation())
    judge = BaseLikeJudge(base.images)
    base = recognition_score(pipe, STAR, judge, STAR.prompts(), SETTINGS.generation())
    assert base.rate == 1.0
    return pipe, patch, judge, base


def test_the_row_patch_hides_the_word(hidden):
    pipe, patch, judge, _ = hidden
    with applied(pipe, [patch]):
        g = recognition_score(pipe, STAR, judge, STAR.prompts(), SETTINGS.generation())
    assert g.rate == 0.0


def test_encoder_recovers_what_the_rows_hide(hidden):
    pipe, patch, judge, base = hidden
    found = attacks.run("encoder", pipe, [patch], STAR, judge, SETTINGS, base=base)
    assert found.rate == 1.0 and found.attack == "encoder"


def test_adversarial_search_beats_the_hidden_prompt(hidden):
    pipe, patch, _, base = hidden
    from forget_me_not.attacks.adversarial import _pixels
    from forget_me_not.data import model_resolution

    pixels = _pixels(base.images, model_resolution(pipe))
    found = search(pipe, [patch], STAR.prompts(), pixels, num_tokens=2, budget=20, lr=0.05,
                   seed=0)
    assert len(found.tokens) == 2 and found.loss < found.loss_plain
    again = search(pipe, [patch], STAR.prompts(), pixels, num_tokens=2, budget=20, lr=0.05,
                   seed=0)
    assert again.token_ids == found.token_ids  # seeded: the same search finds the same tokens


def test_adversarial_attack_leaves_the_pipeline_as_it_was(hidden):
    pipe, patch, judge, base = hidden
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    found = attacks.run("adversarial", pipe, [patch], STAR, judge, SETTINGS, base=base)
    assert 0.0 <= found.rate <= 1.0 and len(found.detail["tokens"]) == 2
    for k, v in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


def test_inversion_and_prompts_run_against_the_patch(hidden):
    pipe, patch, judge, base = hidden
    inverted = attacks.run("inversion", pipe, [patch], STAR, judge, SETTINGS, base=base)
    assert inverted.detail["phrase"] and len(inverted.prompts) == SETTINGS.n
    said = attacks.run("prompts", pipe, [patch], STAR, judge, SETTINGS, base=base)
    assert said.prompts and not set(said.prompts) & set(STAR.prompts())


def test_bad_attack_input_is_named():
    with pytest.raises(FmnError, match="unknown attack 'magic'.*adversarial"):
        attacks.check(["magic"])
    with pytest.raises(FmnError, match="budget must be at least 1"):
        AttackSettings(budget=0)
    with pytest.raises(FmnError, match="no anchor images.*--images"):
        from forget_me_not.attacks.base import anchors_for

        anchors_for(STAR, 4, None)


def test_cli_attack_writes_every_part_and_refuses_bad_input(world_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from forget_me_not.cli.main import app
    from forget_me_not.methods.token_rows.train import train
    from forget_me_not.models import load_pipeline
    from tiny_pipelines import fmn_config

    pipe = load_pipeline(str(world_dir))
    rows = train(pipe, [STAR], fmn_config(train="tokens", steps=2, reference="noise"))
    patch = rows.save(tmp_path / "rows.safetensors")
    runner = CliRunner()
    common = ["attack", "--model", str(world_dir), "--concept", "star", "--n", "2",
              "--steps", "2", "--budget", "2"]
    out = tmp_path / "attack"
    result = runner.invoke(app, [*common, "--patch", str(patch), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "attack.json").read_text())
    assert set(data["attacks"]) == {"inversion", "encoder", "prompts", "adversarial"}
    parts = [data["g"], *(a["rate"] for a in data["attacks"].values())]
    assert data["m_score"] == max(parts) and "M-Score" in result.output
    assert (out / "adversarial.png").stat().st_size > 0
    from forget_me_not.bench.suites import load_suite

    suite = load_suite("world").settings()  # the search as `fmn bench` runs it
    for key in ("lr", "max_anchors", "num_tokens", "batch_size"):
        assert data["settings"][key] == suite[key], key
    evaluated = runner.invoke(app, ["eval", "--model", str(world_dir), "--suite", "world",
                                    "--concept", "star", "--patch", str(patch), "--n", "2",
                                    "--steps", "2", "--budget", "2", "--attack", "encoder"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "encoder" in evaluated.output and "M-Score" in evaluated.output
    for extra, message in ((["--attack", "magic"], "unknown attack 'magic'"),
                           (["--budget", "0"], "--budget"),
                           (["--attack", "encoder"], "--patch")):
        bad = runner.invoke(app, [*common, *extra])
        assert bad.exit_code == 2 and message in bad.output, bad.output
