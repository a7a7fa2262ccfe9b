"""`fmn patch ...`: inspect, check, rescale, stack, unstack, merge, convert, extract patches and
make placebo controls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError

patch_app = typer.Typer(
    help="Forgetting patches: info, apply (check), scale, stack, remove, merge, convert, extract, "
    "placebo.",
    no_args_is_help=True,
)

PatchFile = Annotated[Path, typer.Option("--patch", help="Patch file (.safetensors).")]
Out = Annotated[Path, typer.Option(help="File to write (.safetensors).")]
Strengths = Annotated[
    list[float] | None,
    typer.Option("--strength", help="Strength per patch, in --patch order (default 1.0)."),
]


def _load(path: Path):
    from forget_me_not.patch import load_patch

    return load_patch(path)


def _strengths(values: list[float] | None, n: int) -> list[float]:
    from forget_me_not.patch import check_strength

    values = list(values or [])
    if len(values) == 1 and n > 1:
        values = values * n
    if values and len(values) != n:
        raise FmnError(f"got {len(values)} --strength values for {n} patches: give one or {n}")
    return [check_strength(v) for v in values] or [1.0] * n


def _out(path: Path) -> Path:
    from forget_me_not.images import check_output_path

    return check_output_path(path, suffix=".safetensors")


@patch_app.command("info")
def info(
    patch: Annotated[Path, typer.Argument(help="Patch file (.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full record as JSON.")] = False,
) -> None:
    """Print what a patch holds: concepts, family, base hash, kind, rank, size, settings."""
    from forget_me_not.patch import describe

    record = describe(_load(patch), patch)
    if as_json:
        typer.echo(json.dumps(record, indent=1, default=str))
        return
    for key in ("name", "kind", "concepts", "family", "base_model_hash", "rank", "lora_alpha",
                "modules", "tensors", "parameters", "strength", "method", "recipe", "train",
                "steps", "seed"):
        value = record.get(key)
        if key == "concepts":
            value = ", ".join(value) or "-"
        typer.echo(f"{key:16s} {value}")
    typer.echo(f"{'size':16s} {record['bytes'] / 1e6:.3f} MB")
    if record.get("placebo"):
        control = record["placebo"]
        typer.echo(f"{'placebo':16s} a control of {control['of']} (seed {control['seed']}): its "
                   "size per layer in random directions, it forgets nothing on purpose")
    for i, part in enumerate(record.get("recipe_parts") or []):
        typer.echo(f"{'recipe part ' + str(i + 1):16s} {part['method']} at {part['scale']:g} of "
                   "its trained size")
    if record.get("scope"):
        typer.echo(f"{'scope':16s} {record['scope']}")
    if record.get("token_rows"):
        rows = ", ".join(f"{n} in {enc}" for enc, n in record["token_rows"].items())
        typer.echo(f"{'token rows':16s} {rows} (the concept's words; plain diffusers "
                   "load_lora_weights does not read them: use fmn, or `fmn patch merge`)")
    if record.get("tokens"):
        typer.echo(f"{'tokens':16s} {' | '.join(' '.join(t) for t in record['tokens'])}")
    for part in record.get("parts", []):
        typer.echo(f"{'part':16s} {part['name']}: {', '.join(part['concepts'])} "
                   f"(strength {part['strength']:g}, rank slice {part.get('rank_slice')})")
    if "extraction" in record:
        ex = record["extraction"]
        typer.echo(f"{'extraction':16s} rank {ex['rank']}, relative error "
                   f"{ex['overall_relative_error']:.4f} overall, {len(ex['dropped'])} dropped")
    if record.get("settings"):
        typer.echo(f"{'settings':16s} {json.dumps(record['settings'], default=str)}")
    if record.get("versions"):
        versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        typer.echo(f"{'versions':16s} {versions}")


@patch_app.command("apply")
def apply(
    patch: Annotated[list[Path], typer.Option("--patch", help="Patch file (repeatable).")],
    model: opt.Model = "embedded",
    strength: Strengths = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Check that patches apply to --model (no generation): what they touch, and clean removal."""
    import torch

    from forget_me_not.models import load_pipeline

    patches = [_load(p) for p in patch]
    strengths = _strengths(strength, len(patches))
    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    before = _probe_output(pipe)
    for p, s, path in zip(patches, strengths, patch, strict=True):
        p.apply(pipe, scale=s)
        modules = len(p.lora_pairs()) if p.kind == "lora" else len(p.unet_tensors)
        rank = f", rank {p.rank}" if p.rank else ""
        rows = (f", {sum(len(ids) for ids, _ in p.token_rows().values())} token rows"
                if p.has_rows else "")
        names = ", ".join(c["name"] for c in p.metadata.get("concepts", []))
        typer.echo(f"{path.name}: {p.kind}{rank}, {modules} modules of the UNet{rows}, strength "
                   f"{s:g}, concepts {names}")
    after = _probe_output(pipe)
    if not torch.isfinite(after).all():
        raise FmnError("the patched model produces non-finite outputs: lower the strength")
    for p in reversed(patches):
        p.remove(pipe)
    restored = torch.equal(_probe_output(pipe), before)
    change = (after - before).norm() / before.norm().clamp_min(1e-12)
    typer.echo(f"applies to {model}: UNet output changes by {change.item():.4f} (relative); "
               f"removal restores the base exactly: {'yes' if restored else 'NO'}")
    if not restored:
        raise FmnError("removing the patches did not restore the base model exactly")


def _probe_output(pipe):
    """One UNet forward on fixed inputs (what `apply` compares)."""
    import torch

    from forget_me_not.data import model_resolution

    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    side = model_resolution(pipe) // int(getattr(pipe, "vae_scale_factor", 8))
    x = torch.randn(1, unet.config.in_channels, side, side, generator=g)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.get("addition_embed_type") == "text_time":
        dim = (unet.config.projection_class_embeddings_input_dim
               - 6 * unet.config.addition_time_embed_dim)
        px = model_resolution(pipe)
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, dim, generator=g),
                                   "time_ids": torch.tensor([[px, px, 0, 0, px, px]]).float()}
    dev, dt = unet.device, unet.dtype
    kw = {k: {n: t.to(dev, dt) for n, t in v.items()} for k, v in kw.items()}
    with torch.no_grad():
        return unet(x.to(dev, dt), torch.tensor([500], device=dev),
                    encoder_hidden_states=ehs.to(dev, dt), **kw).sample.float().cpu()


@patch_app.command("scale")
def scale(patch: PatchFile, strength: Annotated[float, typer.Option(
              help="New strength: 0 (off) .. 1 (as trained) .. 4.")],
          out: Out) -> None:
    """Write a copy of --patch whose effect is --strength times the original's."""
    from forget_me_not.patch import check_strength

    check_strength(strength)
    out = _out(out)
    scaled = _load(patch).scaled(strength)
    scaled.save(out)
    typer.echo(f"wrote {out} (strength {scaled.metadata['strength']:g})")


@patch_app.command("stack")
def stack(
    patches: Annotated[list[Path], typer.Argument(help="Patch files to combine (two or more).")],
    out: Out,
    strength: Strengths = None,
) -> None:
    """Combine several patches into one file with the same effect as applying them all."""
    from forget_me_not.patch import describe, stack_patches

    out = _out(out)
    loaded = [_load(p) for p in patches]
    stacked = stack_patches(loaded, _strengths(strength, len(loaded)))
    stacked.save(out)
    rec = describe(stacked, out)
    typer.echo(f"wrote {out} ({rec['kind']}, rank {rec['rank']}, {len(rec['parts'])} parts: "
               f"{', '.join(rec['concepts'])}; {rec['bytes'] / 1e6:.3f} MB)")


@patch_app.command("remove")
def remove(
    patch: PatchFile,
    out: Out,
    concept: Annotated[list[str] | None, typer.Option(
        help="Take out the part(s) that forget this concept (repeatable).")] = None,
    part: Annotated[list[str] | None, typer.Option(
        help="Take out the part with this name (see `fmn patch info`; repeatable).")] = None,
) -> None:
    """Write the stacked --patch without some of its parts (exact)."""
    from forget_me_not.patch import unstack

    drop = [*(concept or []), *(part or [])]
    if not drop:
        raise FmnError("say what to take out: --concept NAME or --part NAME")
    out = _out(out)
    rest = unstack(_load(patch), drop)
    rest.save(out)
    left = ", ".join(c for p in rest.metadata["parts"] for c in p["concepts"])
    typer.echo(f"wrote {out} (rank {rest.rank}; still forgets: {left})")


@patch_app.command("merge")
def merge(
    patch: Annotated[list[Path], typer.Option("--patch", help="Patch file (repeatable).")],
    out: Annotated[Path, typer.Option(help="New folder for the full pipeline.")],
    model: opt.Model = "embedded",
    strength: Strengths = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Fuse patches into --model's weights and save the full pipeline (save_pretrained)."""
    from forget_me_not.models import embedded_model_dir, load_pipeline
    from forget_me_not.patch import merge_into, save_merged

    if out.exists():
        raise FmnError(f"{out} already exists: pick a new folder for the merged pipeline")
    if not out.parent.is_dir():
        raise FmnError(f"folder {out.parent} does not exist: create it first")
    patches = [_load(p) for p in patch]
    strengths = _strengths(strength, len(patches))
    pipe = load_pipeline(model, device, dtype or "float32", allow_pickle=allow_pickle,
                         config=config)
    merge_into(pipe, patches, strengths)
    source = embedded_model_dir() if model == "embedded" else Path(model)
    save_merged(pipe, patches, out, source if source.is_dir() else None)
    typer.echo(f"wrote the merged pipeline {out} ({len(patches)} patch(es) fused)")


@patch_app.command("convert")
def convert(
    patch: PatchFile,
    out: Out,
    to: Annotated[str, typer.Option("--to", help="Target format: kohya (A1111, ComfyUI).")],
) -> None:
    """Write --patch in another LoRA format (kohya: lora_down / lora_up / alpha keys)."""
    from forget_me_not.patch import save_kohya

    if to != "kohya":
        raise FmnError(f"unknown format {to!r}: use --to kohya (the format A1111 and ComfyUI read)")
    out = _out(out)
    save_kohya(_load(patch), out)
    typer.echo(f"wrote {out} (kohya LoRA; load it in A1111/ComfyUI or pipe.load_lora_weights)")


@patch_app.command("extract")
def extract(
    patch: PatchFile,
    rank: Annotated[int, typer.Option(help="LoRA rank to keep per layer.")],
    out: Out,
) -> None:
    """Turn a full-weight delta patch into a LoRA by truncated SVD; prints the error."""
    from forget_me_not.patch import extract_lora

    opt.require_positive("--rank", rank)
    out = _out(out)
    lora = extract_lora(_load(patch), rank)
    lora.save(out)
    ex = lora.metadata["extraction"]
    worst = max(ex["per_layer_relative_error"].items(), key=lambda kv: kv[1])
    for module, err in sorted(ex["per_layer_relative_error"].items()):
        typer.echo(f"  {module}: {err:.4f}")
    typer.echo(
        f"wrote {out} (rank {rank}; relative Frobenius error {ex['overall_relative_error']:.4f} "
        f"overall, worst layer {worst[1]:.4f}; {len(ex['dropped'])} non-2-D tensors dropped)"
    )


@patch_app.command("placebo")
def placebo(
    patch: PatchFile,
    out: Out,
    seed: Annotated[int, typer.Option(help="Seed of the random directions.")] = 1,
) -> None:
    """Write a control patch: --patch's size per layer, in random directions (score it beside
    the real one to see what the size of the change alone costs the other concepts)."""
    from forget_me_not.placebo import placebo as make_placebo

    out = _out(out)
    control = make_placebo(_load(patch), seed)
    control.save(out)
    typer.echo(f"wrote {out} ({control.kind}, same size per layer as {patch.name}, seed {seed})")


def register(app: typer.Typer) -> None:
    app.add_typer(patch_app, name="patch")
