"""The patch ecosystem: strength, stacking, unstacking, extraction, merging, kohya, sizes, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from forget_me_not.cli.main import app
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.fmn.config import LORA_TARGETS
from forget_me_not.patch import (
    check_strength,
    extract_lora,
    load_patch,
    merge_into,
    save_kohya,
    save_merged,
    stack_patches,
    unstack,
)
from forget_me_not.placebo import placebo
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any, unet_probe

runner = CliRunner()


def _patch(concept="star", train="lora", rank=None, lr=1e-2):
    cfg = fmn_config(steps=2, reference="noise", train=train, lr=lr, lora_rank=rank)
    return train_any(make_tiny_pipeline("sd1"), [Concept(concept)], cfg, progress=False)


@pytest.fixture(scope="module")
def star():
    return _patch("star", rank=2)


@pytest.fixture(scope="module")
def moon():
    return _patch("moon", rank=4)


@pytest.fixture(scope="module")
def delta():
    return _patch("heart", train="xattn", lr=1e-3)


def _err(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


# -- library ------------------------------------------------------------------------------------


def test_strength_scales_and_bad_strengths_are_refused(star):
    a, b = make_tiny_pipeline("sd1"), make_tiny_pipeline("sd1")
    star.apply(a, scale=0.5)
    star.scaled(0.5).apply(b)
    assert torch.allclose(unet_probe(a), unet_probe(b), atol=1e-6)
    assert star.scaled(0.5).metadata["strength"] == 0.5
    for bad in (-0.1, 4.5, float("nan"), "x"):
        with pytest.raises(FmnError, match="strength"):
            check_strength(bad)
        with pytest.raises(FmnError, match="strength"):
            star.apply(make_tiny_pipeline("sd1"), scale=bad)


def test_stack_same_modules_different_ranks_is_exact_and_removable(star, moon, tmp_path):
    assert star.rank != moon.rank and star.lora_pairs().keys() == moon.lora_pairs().keys()
    pipe = make_tiny_pipeline("sd1")
    base = unet_probe(pipe)
    star.apply(pipe)
    moon.apply(pipe, scale=0.5)  # two adapters of different ranks on the same modules
    both = unet_probe(pipe)
    moon.remove(pipe)
    star.remove(pipe)
    assert torch.equal(base, unet_probe(pipe))

    stacked = stack_patches([star, moon], [1.0, 0.5])
    assert stacked.rank == star.rank + moon.rank
    path = stacked.save(tmp_path / "stack.safetensors")
    loaded = load_patch(path)
    assert [p["concepts"] for p in loaded.metadata["parts"]] == [["star"], ["moon"]]
    loaded.apply(pipe)
    assert torch.allclose(unet_probe(pipe), both, atol=1e-5)
    loaded.remove(pipe)
    assert torch.equal(base, unet_probe(pipe))

    only_star = unstack(loaded, ["moon"])
    assert only_star.rank == star.rank
    only_star.apply(pipe)
    ref = make_tiny_pipeline("sd1")
    star.apply(ref)
    assert torch.allclose(unet_probe(pipe), unet_probe(ref), atol=1e-6)
    with pytest.raises(FmnError, match="no part of this stack"):
        unstack(loaded, ["zebra"])
    with pytest.raises(FmnError, match="not a stack"):
        unstack(star, ["star"])


def test_stack_with_a_delta_patch_sums_deltas(star, delta):
    pipe, ref = make_tiny_pipeline("sd1"), make_tiny_pipeline("sd1")
    star.apply(ref)
    delta.apply(ref)
    stacked = stack_patches([star, delta])
    assert stacked.kind == "delta"
    stacked.apply(pipe)
    assert torch.allclose(unet_probe(pipe), unet_probe(ref), atol=1e-5)


def test_extract_lora_reports_error_and_full_rank_is_exact(delta):
    full = extract_lora(delta, rank=64)
    ex = full.metadata["extraction"]
    # Full rank reproduces every weight; only the output projection's bias cannot be carried.
    assert max(ex["per_layer_relative_error"].values()) < 1e-5
    assert ex["dropped"] and all(k.endswith(".bias") for k in ex["dropped"])
    assert 0 < ex["overall_relative_error"] < 1
    assert set(ex["per_layer_relative_error"]) == set(full.lora_pairs())
    weights_only = dataclasses.replace(
        delta, tensors={k: v for k, v in delta.tensors.items() if k.endswith(".weight")})
    a, b = make_tiny_pipeline("sd1"), make_tiny_pipeline("sd1")
    weights_only.apply(a)
    full.apply(b)
    assert torch.allclose(unet_probe(a), unet_probe(b), atol=1e-5)
    low = extract_lora(delta, rank=1).metadata["extraction"]
    assert 0 < low["overall_relative_error"] < 1
    assert all(0 <= e <= 1 for e in low["per_layer_relative_error"].values())
    whole = extract_lora(_patch("heart", train="unet", lr=1e-3), rank=2)
    assert whole.metadata["extraction"]["dropped"]  # biases, norms, convolutions
    with pytest.raises(FmnError, match="already a LoRA"):
        extract_lora(full, 2)


def test_extract_lora_carries_convolutions_exactly_only_when_asked():
    whole = _patch("heart", train="unet", lr=1e-3)
    weights = {k: v for k, v in whole.tensors.items()
               if k.endswith(".weight") and v.ndim in (2, 4)}
    assert any(v.ndim == 4 for v in weights.values())
    weights_only = dataclasses.replace(whole, tensors=weights)
    rank = max(min(t.flatten(1).shape) for t in weights.values())
    assert extract_lora(weights_only, rank).metadata["extraction"]["dropped"]  # convs by default
    lora = extract_lora(weights_only, rank, convolutions=True)
    assert not lora.metadata["extraction"]["dropped"]
    a, b = make_tiny_pipeline("sd1"), make_tiny_pipeline("sd1")
    weights_only.apply(a)
    lora.apply(b)  # peft's conv LoRA: a kernel-sized down conv, a 1x1 up conv
    assert torch.allclose(unet_probe(a), unet_probe(b), atol=1e-4)


def test_merge_writes_a_pipeline_with_the_patch_fused(star, delta, tmp_path):
    ref = make_tiny_pipeline("sd1")
    star.apply(ref)
    delta.apply(ref, scale=0.5)
    pipe = make_tiny_pipeline("sd1")
    merge_into(pipe, [star, delta], [1.0, 0.5])
    out = save_merged(pipe, [star, delta], tmp_path / "merged")
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    assert torch.allclose(unet_probe(reloaded), unet_probe(ref), atol=1e-5)
    record = json.loads((out / "forget_me_not_merge.json").read_text())
    assert [p["name"] for p in record["merged_patches"]] == [star.name, delta.name]
    with pytest.raises(FmnError, match="already exists"):
        save_merged(pipe, [star], out)


def test_damaged_and_foreign_patches_are_refused(star, tmp_path):
    path = star.save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FmnError, match="not a readable"):
        load_patch(tmp_path / "cut.safetensors")
    bad = load_patch(path)
    key = next(k for k in bad.tensors if ".lora_A." in k)
    bad.tensors[key] = bad.tensors[key][:1]
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(FmnError, match="damaged"):
        load_patch(tmp_path / "bad.safetensors")
    sdxl = train_any(make_tiny_pipeline("sdxl"), [Concept("star")],
                   fmn_config(steps=1, reference="noise"), progress=False)
    with pytest.raises(FmnError, match=r"different model families: .*\(sd1\).*\(sdxl\)"):
        stack_patches([star, sdxl])
    with pytest.raises(FmnError, match="does not fit this UNet"):
        # no family recorded, other layer sizes: made for another model
        unknown = dataclasses.replace(star, metadata={**star.metadata, "family": None,
                                                      "base_model_hash": None})
        unknown.apply(make_tiny_pipeline("sd2"))


# -- diffusers and kohya loading without this package -------------------------------------------

_PLAIN = textwrap.dedent("""
    import sys, torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    model, lora, kohya, out = sys.argv[1:5]
    res = {}
    for name, path in (("diffusers", lora), ("kohya", kohya)):
        pipe = StableDiffusionPipeline.from_pretrained(model)
        pipe.load_lora_weights(path)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 8, 8, generator=g)
        ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
        with torch.no_grad():
            res[name] = pipe.unet(x, torch.tensor([300]), encoder_hidden_states=ehs).sample
    assert not any(m.startswith("forget_me_not") for m in sys.modules)
    save_file(res, out)
""")


def test_plain_diffusers_and_kohya_loading_match_patch_apply(star, tiny_pipeline_dir, tmp_path):
    model = tiny_pipeline_dir("sd1")
    lora = star.save(tmp_path / "star.safetensors")
    kohya = save_kohya(star, tmp_path / "star_kohya.safetensors")
    keys = load_file(kohya)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight",
               ".lora_up.weight", ".alpha")) for k in keys)
    out = tmp_path / "outputs.safetensors"
    subprocess.run([sys.executable, "-c", _PLAIN, str(model), str(lora), str(kohya), str(out)],
                   check=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                  "PATH": "/usr/bin:/bin"})
    plain = load_file(out)
    ours = StableDiffusionPipeline.from_pretrained(model)
    star.apply(ours)
    expected = unet_probe(ours)
    assert torch.allclose(plain["diffusers"], expected, atol=1e-5)
    assert torch.allclose(plain["kohya"], expected, atol=1e-5)


def test_kohya_export_of_a_stacked_and_an_sdxl_patch_loads_in_diffusers(star, moon, tmp_path):
    stacked = stack_patches([star, moon])
    path = save_kohya(stacked, tmp_path / "k.safetensors")
    plain, ours = make_tiny_pipeline("sd1"), make_tiny_pipeline("sd1")
    plain.load_lora_weights(str(path))
    stacked.apply(ours)
    assert torch.allclose(unet_probe(plain), unet_probe(ours), atol=1e-5)
    with pytest.raises(FmnError, match="fmn patch extract"):
        save_kohya(_patch("heart", train="xattn", lr=1e-3), tmp_path / "d.safetensors")


# -- sizes ----------------------------------------------------------------------------------------


def _lora_bytes(unet, rank=fmn_config().lora_rank, targets=LORA_TARGETS) -> int:
    """float32 bytes of the default LoRA: rank * (in + out) per targeted attn2 projection."""
    n = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
                name.endswith(f"attn2.{t}") for t in targets):
            n += rank * (module.in_features + module.out_features)
    return 4 * n


def test_tiny_patch_size_matches_its_parameter_count(star, tmp_path):
    path = star.save(tmp_path / "p.safetensors")
    expected = _lora_bytes(make_tiny_pipeline("sd1").unet, rank=star.rank)
    assert sum(v.numel() for v in star.tensors.values()) * 4 == expected
    assert expected <= path.stat().st_size <= expected + 16_384  # + header


def test_default_lora_patch_for_sd15_shapes_is_under_10_mb():
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
                                    attention_head_dim=8)  # the SD 1.5 UNet config
    size = _lora_bytes(unet)
    assert 0 < size <= 10e6, size


def test_default_lora_patch_for_the_embedded_model_is_under_2_mb():
    from forget_me_not.world.model import WorldModelConfig, build_unet

    with torch.device("meta"):
        unet = build_unet(WorldModelConfig())
    assert 0 < _lora_bytes(unet) <= 2e6


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_info_scale_stack_remove_convert(star, moon, tmp_path):
    p1, p2 = star.save(tmp_path / "s.safetensors"), moon.save(tmp_path / "m.safetensors")
    r = runner.invoke(app, ["patch", "info", str(p1)])
    assert r.exit_code == 0 and "star" in r.output and "sd1" in r.output, r.output
    r = runner.invoke(app, ["patch", "scale", "--patch", str(p1), "--strength", "0.5",
                            "--out", str(tmp_path / "half.safetensors")])
    assert r.exit_code == 0, r.output
    assert load_patch(tmp_path / "half.safetensors").metadata["strength"] == 0.5
    _err(runner.invoke(app, ["patch", "scale", "--patch", str(p1), "--strength", "5",
                             "--out", str(tmp_path / "x.safetensors")]), "outside 0..4")
    r = runner.invoke(app, ["patch", "stack", str(p1), str(p2), "--out",
                            str(tmp_path / "st.safetensors")])
    assert r.exit_code == 0 and "rank 6" in r.output, r.output
    r = runner.invoke(app, ["patch", "remove", "--patch", str(tmp_path / "st.safetensors"),
                            "--concept", "moon", "--out", str(tmp_path / "rest.safetensors")])
    assert r.exit_code == 0 and "still forgets: star" in r.output, r.output
    r = runner.invoke(app, ["patch", "convert", "--patch", str(p1), "--to", "kohya",
                            "--out", str(tmp_path / "k.safetensors")])
    assert r.exit_code == 0, r.output
    _err(runner.invoke(app, ["patch", "convert", "--patch", str(p1), "--to", "ckpt", "--out",
                             str(tmp_path / "y.safetensors")]), "--to kohya")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    _err(runner.invoke(app, ["patch", "info", str(tmp_path / "junk.safetensors")]),
         "not a readable")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("x.", "y."))]


def test_cli_apply_extract_merge(star, delta, tiny_pipeline_dir, tmp_path):
    model = str(tiny_pipeline_dir("sd1"))
    p1, d = star.save(tmp_path / "s.safetensors"), delta.save(tmp_path / "d.safetensors")
    r = runner.invoke(app, ["patch", "apply", "--model", model, "--patch", str(p1),
                            "--patch", str(d), "--strength", "0.5", "--device", "cpu"])
    assert r.exit_code == 0 and "restores the base exactly: yes" in r.output, r.output
    r = runner.invoke(app, ["patch", "extract", "--patch", str(d), "--rank", "2",
                            "--out", str(tmp_path / "e.safetensors")])
    assert r.exit_code == 0 and "relative Frobenius error" in r.output, r.output
    assert "extraction" in load_patch(tmp_path / "e.safetensors").metadata
    r = runner.invoke(app, ["patch", "merge", "--model", model, "--patch", str(p1),
                            "--out", str(tmp_path / "merged"), "--device", "cpu"])
    assert r.exit_code == 0 and (tmp_path / "merged" / "model_index.json").is_file(), r.output
    sdxl = str(tiny_pipeline_dir("sdxl"))
    _err(runner.invoke(app, ["patch", "apply", "--model", sdxl, "--patch", str(p1),
                             "--device", "cpu"]), "made for a sd1 model but the pipeline is sdxl")


def _lora_norms(patch):
    return {k: float((patch.tensors[k.replace("lora_A", "lora_B")] @ a).norm())
            for k, a in patch.tensors.items() if ".lora_A." in k}


def test_placebo_keeps_each_layers_size_and_draws_new_directions(star, delta, tmp_path):
    control = placebo(star, seed=3)
    assert control.kind == "lora" and control.metadata["placebo_of"] == star.name
    trained, drawn = _lora_norms(star), _lora_norms(control)
    assert trained.keys() == drawn.keys()
    for key, norm in trained.items():
        assert drawn[key] == pytest.approx(norm, rel=1e-4)
        if norm == 0:
            continue  # a layer the two steps left untouched stays untouched
        b_key = key.replace("lora_A", "lora_B")
        a = star.tensors[b_key] @ star.tensors[key]
        b = control.tensors[b_key] @ control.tensors[key]
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        assert abs(cosine) < 0.9, key  # another direction, not a rescaled copy
    again, other = placebo(star, seed=3), placebo(star, seed=4)
    assert all(torch.equal(again.tensors[k], v) for k, v in control.tensors.items())
    assert not torch.equal(other.tensors[next(iter(trained))], control.tensors[next(iter(trained))])
    full = placebo(delta, seed=1)
    for key, value in delta.tensors.items():
        assert float(full.tensors[key].norm()) == pytest.approx(float(value.norm()), rel=1e-4)
    rows = _patch("star", train="tokens", lr=5e-3)
    moved = placebo(rows, seed=1)
    for encoder, (ids, delta_rows) in rows.token_rows().items():
        new_ids, new_rows = moved.token_rows()[encoder]
        assert torch.equal(new_ids, ids)
        assert torch.allclose(new_rows.norm(dim=-1), delta_rows.norm(dim=-1), rtol=1e-4)
        assert not torch.allclose(new_rows, delta_rows)
    # It applies like the patch it imitates and comes off exactly.
    pipe = make_tiny_pipeline("sd1")
    before = unet_probe(pipe)
    control.apply(pipe)
    assert not torch.equal(unet_probe(pipe), before)
    control.remove(pipe)
    assert torch.equal(unet_probe(pipe), before)
    path = star.save(tmp_path / "s.safetensors")
    r = runner.invoke(app, ["patch", "placebo", "--patch", str(path), "--seed", "3",
                            "--out", str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0 and "seed 3" in r.output, r.output
    r = runner.invoke(app, ["patch", "info", str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0 and f"a control of {star.name} (seed 3)" in r.output, r.output
    loaded = load_patch(tmp_path / "p.safetensors")
    assert torch.equal(loaded.tensors[next(iter(trained))], control.tensors[next(iter(trained))])
