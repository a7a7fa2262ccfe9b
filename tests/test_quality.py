"""KID on judge features: unbiased near 0 for one distribution, large for two; the helpers the
leaderboard reports with."""

from __future__ import annotations

import numpy as np
import pytest

from forget_me_not.quality import distances, kid, spread, worst_change


def test_kid_separates_distributions_and_is_unbiased():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 16)), rng.normal(size=(64, 16))
    shifted = rng.normal(loc=1.0, size=(64, 16))
    same = [kid(rng.normal(size=(32, 16)), rng.normal(size=(32, 16))) for _ in range(20)]
    assert abs(np.mean(same)) < 0.05  # unbiased: averages to 0 for one distribution
    assert kid(a, shifted) > 10 * abs(kid(a, b))
    with pytest.raises(ValueError, match="at least two"):
        kid(a[:1], b)


def test_worst_change_and_spread_skip_the_targets():
    before = {"star": 1.0, "moon": 1.0, "circle": 2.0}
    after = {"star": 9.0, "moon": 1.5, "circle": 2.2}
    assert worst_change(after, before, skip=["star"]) == ("moon", 0.5)
    assert spread({"moon": 1.0, "star": 5.0}, {"moon": 1.25, "star": 0.0}, skip=["star"]) == 0.25
    assert worst_change({}, before) == (None, None)


def test_distances_use_the_judges_features():
    from PIL import Image

    from forget_me_not.judges.world import WorldJudge
    from forget_me_not.quality import references

    judge = WorldJudge()
    refs = references(["star", "circle"], 8)
    blobs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8))
             for i in range(8)]
    d = distances(judge, {"star": refs["star"][:4] + refs["star"][4:], "circle": blobs}, {
        "star": references(["star"], 8, seed=5)["star"], "circle": refs["circle"]})
    assert d["circle"] > d["star"]  # noise is far from circles, star renders near stars


def test_the_judge_rejects_noise_and_blobs_but_keeps_renders():
    import torch
    from PIL import Image

    from forget_me_not.concepts import Concept
    from forget_me_not.judges.world import WorldJudge
    from forget_me_not.quality import references
    from forget_me_not.world.rejects import make_rejects

    judge = WorldJudge()
    renders = references(["circle"], 16, seed=11)["circle"]
    assert judge.recognised(renders, Concept("circle")).mean() >= 0.9
    from forget_me_not.judges.world import images_to_tensor

    x = images_to_tensor(renders)
    subjects = torch.arange(16) % 3  # overlays of different subjects
    bad = make_rejects(x, subjects, torch.Generator().manual_seed(3))
    images = [Image.fromarray(((b.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy())
              for b in bad]
    said = judge.heads(images)["reject"][:, 1]
    assert (said > 0.5).mean() >= 0.8
    assert judge.recognised(images, Concept("circle")).mean() <= 0.2


def test_well_drawn_samples_are_those_every_named_head_reads_as_their_caption():
    import numpy as np
    import torch

    from forget_me_not.judges.world import load_judge_net
    from forget_me_not.world.data import to_unit_range
    from forget_me_not.world.render import Scene, render
    from forget_me_not.world.train_judge import well_drawn

    net = load_judge_net()
    scenes = [Scene("circle", "dotted", "red"), Scene("tavi", "solid"), Scene("star", "striped",
                                                                                "blue")]
    pixels = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes]))
    x = to_unit_range(pixels.permute(0, 3, 1, 2).contiguous())
    right = [("a red circle in dotted style", scenes[0]), ("a photo of tavi", scenes[1]),
             ("a star", scenes[2])]  # the star's caption names neither style nor colour
    assert well_drawn(net, x, right).tolist() == [True, True, True]
    wrong = [("a red circle in striped style", Scene("circle", "striped", "red")),
             ("a photo of milka", Scene("milka", "solid")),
             ("a green star", Scene("star", "striped", "green"))]
    assert well_drawn(net, x, wrong).tolist() == [False, False, False]


def test_kept_samples_need_the_judge_that_picks_them_and_the_model(tmp_path):
    from typer.testing import CliRunner

    from forget_me_not.cli.main import app

    res = CliRunner().invoke(app, ["world", "train-judge", "--run-dir", str(tmp_path),
                                   "--kept-samples", "8"])
    assert res.exit_code != 0
    assert "--kept-samples needs --init" in res.output
