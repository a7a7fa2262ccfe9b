"""Loading a text-to-image pipeline from wherever the user keeps it, and knowing its family.

Sources: "embedded" (the shipped ConceptWorld model), a diffusers folder (model_index.json), a
single-file checkpoint (.safetensors; pickles only on request), or a hub id (owner/name).
Families: "sd1", "sd2", "sdxl", and "embedded" for ConceptWorld.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError

FAMILIES = ("sd1", "sd2", "sdxl", "embedded")
EMBEDDED = "embedded"
# A ConceptWorld model folder holds this file beside model_index.json; its presence marks the
# pipeline as the embedded family (it is a StableDiffusionPipeline like any other).
WORLD_MARKER = "conceptworld.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def embedded_model_dir() -> Path:
    """Where the shipped ConceptWorld pipeline lives inside the package."""
    return Path(__file__).resolve().parent / "world" / "weights" / "model"


# ---------------------------------------------------------------------------------------------
# device and dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """ "cpu", "cuda", "cuda:N" or "mps"; None picks CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device).strip().lower()
    if not _DEVICE_RE.match(name):
        raise FmnError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FmnError(f"device {name!r} requested but CUDA is not available here; use cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise FmnError(
                f"device {name!r} does not exist (found {torch.cuda.device_count()} CUDA "
                "device(s)); pick a lower index"
            )
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise FmnError("device 'mps' requested but Apple MPS is not available here; use cpu")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name (float32/fp32, float16/fp16, bfloat16/bf16); None = float16 on CUDA, else 32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise FmnError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).strip().lower()
    if key not in DTYPES:
        raise FmnError(f"unknown dtype {str(dtype)!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


# ---------------------------------------------------------------------------------------------
# loading


def load_pipeline(
    source: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    config: str | Path | None = None,
):
    """Load a diffusers text-to-image pipeline from `source`, on `device` in `dtype`.

    The result carries `pipe.fmn_family` ("sd1" | "sd2" | "sdxl" | "embedded") and
    `pipe.fmn_source`. Every user mistake raises FmnError with the fix in the message.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    text = str(source)
    path = Path(text).expanduser()

    if text == EMBEDDED:
        folder = embedded_model_dir()
        if not (folder / "model_index.json").is_file():
            raise FmnError(
                "the embedded ConceptWorld weights are missing from the installed package; "
                "reinstall forget-me-not or pass --model with a pipeline folder"
            )
        pipe = _from_folder(folder, dt)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FmnError(
                f"{text} is a folder but not a diffusers pipeline (no model_index.json); pass a "
                "folder written by save_pipeline/save_pretrained or a .safetensors file"
            )
        pipe = _from_folder(path, dt)
    elif path.is_file():
        pipe = _from_single_file(path, dt, allow_pickle=allow_pickle, config=config)
    elif _HUB_ID_RE.match(text) and not text.endswith((".safetensors", *PICKLE_SUFFIXES)):
        pipe = _from_hub(text, dt)
    else:
        raise FmnError(
            f"{text}: no such file or folder; pass a diffusers folder, a .safetensors "
            "checkpoint, a hub id (owner/name) or 'embedded'"
        )

    pipe.to(dev)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe.fmn_source = text
    pipe.fmn_family = detect_family(pipe)
    return pipe


def _from_folder(folder: Path, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        with _quiet_dtype_deprecation():
            pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise FmnError(f"could not load the pipeline in {folder}: {_first_line(err)}") from err
    if (folder / WORLD_MARKER).is_file():
        pipe.fmn_family = EMBEDDED
    return pipe


@contextmanager
def _quiet_dtype_deprecation():
    # Newer diffusers renamed torch_dtype to dtype; the old name works across our range.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _from_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        with _quiet_dtype_deprecation():
            return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not reachable"
        why = "the model hub is offline here" if _hub_offline() else _first_line(err)
        raise FmnError(
            f"cannot load {repo_id!r} from the model hub ({why}); download it where the hub is "
            "reachable and pass the local folder with --model"
        ) from err


def _from_single_file(
    path: Path, dtype: torch.dtype, *, allow_pickle: bool, config: str | Path | None
):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FmnError(
                f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                ".safetensors, or pass --allow-pickle if you trust its source"
            )
        warnings.warn(
            f"loading pickle checkpoint {path} (weights only); prefer .safetensors",
            UserWarning,
            stacklevel=3,
        )
        shapes = _pickle_shapes(path)
    elif suffix == ".safetensors":
        shapes = _safetensors_shapes(path)
    else:
        raise FmnError(
            f"{path}: unsupported file type {suffix or '(none)'}; pass a .safetensors "
            "checkpoint or a diffusers folder"
        )

    family = family_from_state_dict(shapes)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config is not None:
        cfg = Path(config).expanduser()
        if not (cfg / "model_index.json").is_file():
            raise FmnError(
                f"--config {config} is not a diffusers pipeline folder (no model_index.json); "
                "pass a local folder of the same family as the checkpoint"
            )
        kwargs.update(config=str(cfg), local_files_only=True)
    elif _hub_offline():
        raise FmnError(
            f"{path.name} is a single-file {family} checkpoint and its diffusers config cannot be "
            "fetched offline; pass --config with a local pipeline folder of the same family"
        )
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with _quiet_dtype_deprecation():
            pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001 - diffusers raises many kinds on a mismatched file
        raise FmnError(
            f"could not load {path.name} as a {family} checkpoint: {_first_line(err)}; check "
            "that --config is a pipeline of the same family and size"
        ) from err
    return pipe


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the header, checking the file holds every tensor it announces."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        # safe_open maps the file lazily; compare the announced data length with the file's.
        end = 0
        for meta in _safetensors_header(path).values():
            if isinstance(meta, dict) and "data_offsets" in meta:
                end = max(end, int(meta["data_offsets"][1]))
    except FmnError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise FmnError(
            f"{path} is not a readable .safetensors file ({_first_line(err)}); it may be "
            "truncated or corrupt: download or export it again"
        ) from err
    header_len = _header_len(path)
    if path.stat().st_size < 8 + header_len + end:
        raise FmnError(
            f"{path} is truncated ({path.stat().st_size} bytes, header announces "
            f"{8 + header_len + end}); download or export it again"
        )
    if not shapes:
        raise FmnError(f"{path} holds no tensors; pass a full pipeline checkpoint")
    return shapes


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _safetensors_header(path: Path) -> dict[str, Any]:
    n = _header_len(path)
    with open(path, "rb") as f:
        f.seek(8)
        return json.loads(f.read(n))


def _pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise FmnError(
            f"{path} could not be read as a weights-only checkpoint ({_first_line(err)}); "
            "convert it to .safetensors"
        ) from err
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FmnError(f"{path} does not hold a state dict; pass a pipeline checkpoint")
    return {k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# family detection


def family_from_state_dict(shapes: dict[str, tuple[int, ...]]) -> str:
    """ "sdxl" | "sd2" | "sd1" from an original (LDM-layout) checkpoint's keys and shapes."""
    if any(k.startswith("conditioner.embedders.1.") for k in shapes):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"  # OpenCLIP text tower
    for key, shape in shapes.items():
        # Cross-attention key projection: (inner_dim, context_dim); SD2's context is 1024 wide.
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            return "sd2" if shape[-1] == 1024 else "sd1"
    return "sd1"


def detect_family(pipe) -> str:
    """ "sd1" | "sd2" | "sdxl" | "embedded" for a loaded pipeline (also set as pipe.fmn_family)."""
    family = getattr(pipe, "fmn_family", None)
    if family == EMBEDDED:
        return EMBEDDED
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if name and (Path(str(name)) / WORLD_MARKER).is_file():
        family = EMBEDDED
    elif getattr(pipe, "text_encoder_2", None) is not None or (
        pipe.unet.config.get("addition_embed_type") == "text_time"
    ):
        family = "sdxl"
    elif pipe.unet.config.get("cross_attention_dim") == 1024 or pipe.unet.config.get(
        "use_linear_projection"
    ):
        family = "sd2"  # SD 2.x switched the transformers' projections to linear layers
    else:
        family = "sd1"
    try:
        pipe.fmn_family = family
    except AttributeError:  # pragma: no cover - a pipeline class that forbids new attributes
        pass
    return family


# ---------------------------------------------------------------------------------------------
# writing a single-file checkpoint (original LDM layout, what A1111/ComfyUI and
# diffusers' from_single_file read)

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN_TO_LDM = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)


def _rename(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _unet_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise FmnError("per-block layer counts cannot be written as a single file; save a folder")
    direct = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        direct.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        direct.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    up_has_attn = {
        int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k
    }

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in direct:
            new = direct[key]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            first = 1 + b * (lpb + 1)  # input_blocks.0 is conv_in
            if kind == "resnets":
                new = (
                    f"input_blocks.{first + int(p[3])}.0.{_rename('.'.join(p[4:]), _RESNET_TO_LDM)}"
                )
            elif kind == "attentions":
                new = f"input_blocks.{first + int(p[3])}.1.{'.'.join(p[4:])}"
            else:  # downsamplers.0.conv.<w>
                new = f"input_blocks.{first + lpb}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            if p[1] == "resnets":
                new = f"middle_block.{2 * int(p[2])}.{_rename('.'.join(p[3:]), _RESNET_TO_LDM)}"
            else:
                new = f"middle_block.1.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            first = b * (lpb + 1)
            if kind == "resnets":
                rest = _rename(".".join(p[4:]), _RESNET_TO_LDM)
                new = f"output_blocks.{first + int(p[3])}.0.{rest}"
            elif kind == "attentions":
                new = f"output_blocks.{first + int(p[3])}.1.{'.'.join(p[4:])}"
            else:  # the upsampler follows the attention when the block has one
                slot = 2 if b in up_has_attn else 1
                new = f"output_blocks.{first + lpb}.{slot}.conv.{p[-1]}"
        else:
            raise FmnError(f"cannot map UNet weight {key!r} to a single file; save a folder")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in direct:
            new = direct[key]
        elif p[1] == "down_blocks":
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"encoder.down.{p[2]}.block.{p[4]}.{rest}"
            else:
                new = f"encoder.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks":
            ldm_block = n_up - 1 - int(p[2])  # LDM numbers decoder levels from the bottom
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"decoder.up.{ldm_block}.block.{p[4]}.{rest}"
            else:
                new = f"decoder.up.{ldm_block}.upsample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{rest}"
        elif p[1] == "mid_block":
            new = f"{p[0]}.mid.attn_1.{_rename('.'.join(p[4:]), _VAE_ATTN_TO_LDM)}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        else:
            raise FmnError(f"cannot map VAE weight {key!r} to a single file; save a folder")
        out["first_stage_model." + new] = value
    return out


def _text_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as `text_model.…` / `text_projection.weight`, whatever transformers' nesting."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(("text_model.", "text_projection.")):
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def _clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _text_model_keys(sd).items()}


def _openclip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    sd = _text_model_keys(sd)
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP multiplies x @ proj
        elif key.startswith("text_model.encoder.layers."):
            p = key.split(".")
            layer, rest = p[3], ".".join(p[4:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                continue  # fused below
            out[f"{prefix}transformer.resblocks.{layer}.{_rename(rest, _OPENCLIP_LAYER)}"] = value
        else:
            raise FmnError(f"cannot map text-encoder weight {key!r} to a single file")
    layers = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")}
    for layer in layers:
        base = f"text_model.encoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            # OpenCLIP's nn.MultiheadAttention stores q, k, v stacked: (3 * hidden, hidden)
            qkv = [sd[f"{base}{n}_proj.{kind}"] for n in ("q", "k", "v")]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
    return out


def save_single_file(pipe, path: str | Path) -> Path:
    """Write `pipe` as one original-layout .safetensors checkpoint (UNet, VAE, text encoders)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise FmnError(f"{path}: single-file checkpoints are written as .safetensors")
    family = detect_family(pipe)
    structure = "sd2" if pipe.unet.config.get("use_linear_projection") else "sd1"
    if getattr(pipe, "text_encoder_2", None) is not None:
        structure = "sdxl"

    tensors = _unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    tensors.update(_vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if structure == "sdxl":
        tensors.update(
            _clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        )
        tensors.update(
            _openclip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
        )
    elif structure == "sd2":
        tensors.update(_openclip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:
        tensors.update(
            _clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer.")
        )

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", "fmn_family": family}
    _check_writable_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_writable_parent(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FmnError(f"folder {parent} does not exist; create it first or pick another path")
    if not os.access(parent, os.W_OK):
        raise FmnError(f"folder {parent} is not writable; pick another output path")
