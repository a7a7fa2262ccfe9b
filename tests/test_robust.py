"""FMN's robust mode (adversarial re-steering) and the erase term on a tiny pipeline."""

from __future__ import annotations

import pytest
import torch

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any, unet_probe


def _cfg(**kw):
    return fmn_config(**{"steps": 4, "reference": "noise", "lr": 1e-2, "lora_rank": 2, **kw})


def test_adversarial_resteering_trains_against_a_learnt_token_and_leaves_no_token():
    pipe = make_tiny_pipeline("sd1")
    vocab = len(pipe.tokenizer)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    probe = unet_probe(pipe)
    plain = train_any(pipe, [Concept("star")], _cfg())
    robust = train_any(pipe, [Concept("star")], _cfg(adversarial_every=2, adversarial_steps=2))
    assert len(pipe.tokenizer) == vocab and "<fmn-adv0>" not in pipe.tokenizer.get_vocab()
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight, table,
                               rtol=0, atol=0)
    torch.testing.assert_close(unet_probe(pipe), probe, rtol=0, atol=0)  # UNet put back
    # The adversary's rows joined the batch: the run is not the plain one.
    assert any(not torch.equal(robust.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_the_erase_term_is_logged_and_changes_the_patch():
    pipe = make_tiny_pipeline("sd1")
    plain = train_any(pipe, [Concept("star")], _cfg())
    erased = train_any(pipe, [Concept("star")], _cfg(erase_weight=1.0, erase_guidance=1.0))
    assert len(erased.metadata["term_losses"]["erase"]) == 4
    assert "erase" not in plain.metadata["term_losses"]
    assert any(not torch.equal(erased.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_the_erase_term_can_keep_the_prompts_other_words():
    pipe = make_tiny_pipeline("sd1")
    erase = {"erase_weight": 1.0, "erase_guidance": 1.0}
    context = Concept("star", templates=("a red {} on grass",))
    empty = train_any(pipe, [context], _cfg(**erase))
    neutral = train_any(pipe, [context], _cfg(**erase, erase_neutral="prompt"))
    assert any(not torch.equal(neutral.tensors[k], empty.tensors[k]) for k in empty.tensors)
    # A bare word has no other words: its neutral prompt is the empty one, the same patch.
    bare = Concept("star", templates=("{}",))
    a = train_any(pipe, [bare], _cfg(**erase))
    b = train_any(pipe, [bare], _cfg(**erase, erase_neutral="prompt"))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_the_retention_can_hold_the_guided_prediction():
    pipe = make_tiny_pipeline("sd1")
    keep = {"preserve_weight": 1.0, "preserve_prompts": ("a photo of a circle",)}
    plain = train_any(pipe, [Concept("star")], _cfg(**keep))
    held = train_any(pipe, [Concept("star")], _cfg(**keep, preserve_guidance=7.5))
    assert len(held.metadata["term_losses"]["preserve"]) == 4
    assert any(not torch.equal(held.tensors[k], plain.tensors[k]) for k in plain.tensors)
    # At scale 1 the guided prediction is the prompt's own: the same patch, to float rounding.
    one = train_any(pipe, [Concept("star")], _cfg(**keep, preserve_guidance=1.0))
    assert all(torch.allclose(one.tensors[k], plain.tensors[k], atol=1e-5) for k in plain.tensors)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_run_stops_where_the_pull_is_low_and_is_the_run_of_that_many_steps(family, capsys):
    pipe = make_tiny_pipeline(family)
    # Any reading is below 100: the run stops at the first check.
    early = train_any(pipe, [Concept("star")], _cfg(steps=8, stop_pull=100.0, stop_every=3),
                      progress=True)
    assert early.metadata["stop"]["at"] == 3 and early.metadata["stop"]["reached"]
    assert "at step 3: stopped there" in capsys.readouterr().err
    assert len(early.metadata["losses"]) == 3
    # The checks draw nothing from the run: the state is that of a 3-step run.
    three = train_any(pipe, [Concept("star")], _cfg(steps=3))
    assert "stop" not in three.metadata
    assert all(torch.equal(early.tensors[k], three.tensors[k]) for k in three.tensors)


def test_a_run_that_never_gets_low_enough_keeps_its_lowest_pull_state(capsys):
    pipe = make_tiny_pipeline("sd1")
    run = train_any(pipe, [Concept("star")], _cfg(steps=5, stop_pull=1e-9, stop_every=2),
                    progress=True)
    stop = run.metadata["stop"]
    assert not stop["reached"] and [s for s, _ in stop["pull"]] == [2, 4, 5]
    lowest = min(stop["pull"], key=lambda reading: reading[1])[0]
    assert stop["at"] == lowest
    # The log says which state was kept, not only that the run went to the end.
    assert f"kept step {lowest}, where it was lowest" in capsys.readouterr().err
    same = train_any(pipe, [Concept("star")], _cfg(steps=lowest))
    assert all(torch.equal(run.tensors[k], same.tensors[k]) for k in same.tensors)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_restarts_keep_the_run_with_the_lowest_pull_at_its_end(family, capsys):
    pipe = make_tiny_pipeline(family)
    run = train_any(pipe, [Concept("star")], _cfg(restarts=3, seed=4), progress=True)
    tried = run.metadata["restarts"]["runs"]
    assert [r["seed"] for r in tried] == [4, 5, 6]
    kept = min(tried, key=lambda r: r["pull"])["seed"]
    assert run.metadata["restarts"]["kept"] == kept
    assert f"kept the run from seed {kept}" in capsys.readouterr().err
    # The patch is that seed's single run, bit for bit.
    alone = train_any(pipe, [Concept("star")], _cfg(seed=kept))
    assert "restarts" not in alone.metadata
    assert all(torch.equal(run.tensors[k], alone.tensors[k]) for k in alone.tensors)
    # The runs differ: the pull is read on the same latents and tells them apart.
    assert len({r["pull"] for r in tried}) == 3


def test_restarts_read_every_run_on_latents_the_base_model_drew(monkeypatch):
    from forget_me_not.methods.fmn.stopping import PullCheck
    from forget_me_not.methods.fmn.trainable import TRAIN_ADAPTER

    made = []
    original = PullCheck.__init__

    def spy(self, run, *args, **kwargs):
        made.append(TRAIN_ADAPTER in (getattr(run.unet, "peft_config", None) or {}))
        original(self, run, *args, **kwargs)

    monkeypatch.setattr(PullCheck, "__init__", spy)
    train_any(make_tiny_pipeline("sd1"), [Concept("star")], _cfg(restarts=3))
    assert made == [False]  # one reader for the three runs, made before any LoRA existed


def test_restarts_read_the_pull_on_the_levels_the_patch_ships():
    pipe = make_tiny_pipeline("sd1")
    probe = unet_probe(pipe)
    every = train_any(pipe, [Concept("star")], _cfg(restarts=2, steps=6, lr=0.1))
    coarse = train_any(pipe, [Concept("star")], _cfg(restarts=2, steps=6, lr=0.1,
                                                     ship_levels="coarse"))
    pulls = [[r["pull"] for r in p.metadata["restarts"]["runs"]] for p in (every, coarse)]
    assert pulls[0] != pulls[1]  # the same runs, the finest level's LoRA off when read
    torch.testing.assert_close(unet_probe(pipe), probe, rtol=0, atol=0)  # put back


@pytest.mark.parametrize(("key", "value", "match"), [
    ("restarts", 0, "restarts must be an integer >= 1"),
    ("stop_pull", -0.1, "stop_pull"),
    ("stop_every", 0, "stop_every must be an integer >= 1"),
    ("adversarial_every", -1, "adversarial_every must be an integer >= 0"),
    ("adversarial_steps", 0, "adversarial_steps must be an integer >= 1"),
    ("erase_weight", -1.0, "erase_weight"),
    ("preserve_guidance", -1.0, "preserve_guidance"),
    ("erase_neutral", "anchor", "unknown erase_neutral 'anchor': use one of empty, prompt"),
    ("ship_levels", "fine", "unknown ship_levels 'fine': use one of all, coarse"),
])
def test_bad_robust_settings_are_named(key, value, match):
    with pytest.raises(FmnError, match=match):
        fmn_config(**{key: value})


def _combo(tmp_path, sequential: bool = True, second: str = "fmn", first: str = "preserve_set: ''"):
    second_cfg = ("{train: lora, lora_rank: 2, steps: 3, steps_per: run, lr: 1.0e-2, "
                  "reference: noise, preserve_weight: 1.0, "
                  "preserve_prompts: [a photo of a circle]}" if second == "fmn"
                  else "{preserve_set: ''}")
    path = tmp_path / ("combo.yaml" if sequential else "apart.yaml")
    path.write_text(f"description: test\nsequential: {str(sequential).lower()}\nparts:\n"
                    f"  - {{method: uce, config: {{{first}}}}}\n"
                    f"  - {{method: {second}, config: {second_cfg}}}\n")
    return path


def test_a_sequential_recipe_trains_fmn_on_top_of_the_uce_edit_and_compares_with_the_base(
        tmp_path):
    from forget_me_not.api import forget

    pipe = make_tiny_pipeline("sd1")
    probe = unet_probe(pipe)
    combo = forget(pipe, Concept("star"), recipe=_combo(tmp_path), progress=False)
    apart = forget(pipe, Concept("star"), recipe=_combo(tmp_path, sequential=False),
                   progress=False)
    torch.testing.assert_close(unet_probe(pipe), probe, rtol=0, atol=0)  # UNet put back
    assert combo.metadata["method"] == "uce+fmn" and combo.kind == "lora"
    uce_part, fmn_part = combo.metadata["recipe_parts"]
    # The FMN part switched the UCE adapter off for its base-model targets ...
    assert any(name.startswith("uce") for name in fmn_part["settings"]["compare_without"])
    assert not apart.metadata["recipe_parts"][1]["settings"]["compare_without"]
    # ... and, trained beside it, learnt something else than it does on the base model.
    assert uce_part["losses"] == apart.metadata["recipe_parts"][0]["losses"]
    assert fmn_part["losses"] != apart.metadata["recipe_parts"][1]["losses"]


def test_a_uce_delta_is_carried_as_an_exact_lora_for_the_part_after_it(tmp_path):
    from forget_me_not.api import forget

    pipe = make_tiny_pipeline("sd1")
    wide = "preserve_set: '', states: tail, expand_prompts: true"  # rank reaches the width
    combo = forget(pipe, Concept("star"), recipe=_combo(tmp_path, first=wide), progress=False)
    uce_part = combo.metadata["parts"][0]["name"]
    assert combo.kind == "delta" and combo.metadata["method"] == "uce+fmn"
    assert combo.metadata["concepts"] == [Concept("star").to_dict()]
    apart = forget(pipe, Concept("star"), recipe=_combo(tmp_path, sequential=False, first=wide),
                   progress=False)
    # The FMN part trained beside the delta, carried as a LoRA it could switch off by name.
    (switched,) = combo.metadata["recipe_parts"][1]["settings"]["compare_without"]
    assert switched.startswith(f"{uce_part}_r")
    assert combo.metadata["recipe_parts"][1]["losses"] != apart.metadata["recipe_parts"][1][
        "losses"]


def test_a_sequential_recipe_needs_a_later_fmn_lora_part(tmp_path):
    from forget_me_not import recipes

    with pytest.raises(FmnError, match=r"parts\[1\] follows earlier parts"):
        recipes.load(_combo(tmp_path, second="uce"))
    one = tmp_path / "one.yaml"
    one.write_text("sequential: true\nparts:\n  - {method: uce}\n")
    with pytest.raises(FmnError, match="at least two parts"):
        recipes.load(one)


def test_a_patch_of_the_coarse_levels_is_the_trained_lora_without_its_finest_level(family):
    from forget_me_not.methods.fmn.trainable import attention_level

    pipe = make_tiny_pipeline(family)
    n_levels = len(pipe.unet.config.block_out_channels)
    every = train_any(pipe, [Concept("star")], _cfg(steps=2))
    coarse = train_any(pipe, [Concept("star")], _cfg(steps=2, ship_levels="coarse"))

    def level(key):
        return attention_level(key.removeprefix("unet."), n_levels)

    finest = min(level(k) for k in every.tensors)
    # The same training, its finest level left out: the other tensors bit for bit.
    assert coarse.tensors and set(coarse.tensors) == {k for k in every.tensors
                                                      if level(k) > finest}
    assert all(torch.equal(coarse.tensors[k], every.tensors[k]) for k in coarse.tensors)
    assert all(m.split(".")[0] in {"down_blocks", "up_blocks", "mid_block"}
               for m in coarse.lora_config["target_modules"])
    name = next(k.removeprefix("unet.").split(".lora_")[0] for k in coarse.tensors
                if ".lora_B" in k and coarse.tensors[k].abs().sum() > 0)

    def probe():
        module = pipe.unet.get_submodule(name)
        x = torch.randn(1, module.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return module(x)

    before = probe()
    coarse.apply(pipe)  # loads through peft with the named modules only
    assert not torch.equal(probe(), before)
    coarse.remove(pipe)
    torch.testing.assert_close(probe(), before, rtol=0, atol=0)


def test_a_coarse_patch_needs_a_lora():
    pipe = make_tiny_pipeline("sd1")
    with pytest.raises(FmnError, match="ship_levels=coarse keeps part of a LoRA: set train=lora"):
        train_any(pipe, [Concept("star")], fmn_config(train="xattn", ship_levels="coarse"))


def test_a_pruning_delta_with_resnet_channels_is_carried_for_the_part_after_it(tmp_path):
    from forget_me_not.api import forget
    from test_prune import _images

    pipe = make_tiny_pipeline("sd1")
    prune = ("{sites: [ff, resnet], kept_set: '', preserve: [a photo of a cat], "
             "sample_steps: 2, timesteps: [0.3, 0.7], fraction: 0.05, min_ratio: 1.01}")
    lora = ("{train: lora, lora_rank: 2, steps: 3, steps_per: run, lr: 1.0e-2, "
            "reference: noise, preserve_weight: 1.0, preserve_prompts: [a photo of a circle]}")
    path = tmp_path / "prune_then_fmn.yaml"
    path.write_text(f"description: test\nsequential: true\nparts:\n"
                    f"  - {{method: prune, config: {prune}}}\n"
                    f"  - {{method: fmn, config: {lora}}}\n")
    star = Concept("star", images=_images(tmp_path / "star"))
    combo = forget(pipe, star, recipe=path, progress=False)
    assert combo.metadata["method"] == "prune+fmn"
    assert any(key.endswith(".conv2.weight") for key in combo.unet_tensors)  # resnet channels
    # The pruning, convolutions included, rode along as an exact LoRA the FMN part switched off.
    (switched,) = combo.metadata["recipe_parts"][1]["settings"]["compare_without"]
    assert switched.startswith(f"{combo.metadata['parts'][0]['name']}_r")
