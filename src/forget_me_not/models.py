"""Loading a text-to-image pipeline from wherever the user keeps it, and knowing its family.

Sources: "embedded" (the shipped ConceptWorld model), a diffusers folder (model_index.json), a
single-file checkpoint (.safetensors; pickles only on request), or a hub id (owner/name).
Families: "sd1", "sd2", "sdxl", and "embedded" for ConceptWorld.
"""

from __future__ import annotations

import json
import re
import struct
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
        try:
            if _header_len(path) + 8 > path.stat().st_size:
                raise ValueError("header longer than the file")
            meta = _safetensors_header(path).get("__metadata__") or {}
        except (OSError, ValueError, AttributeError, struct.error):
            meta = {}  # a damaged file: the shape reading below says so in its own words
        if "forget_me_not" in meta and "fmn_family" not in meta:
            raise FmnError(f"{path} is a forget-me-not patch, not a model: pass the model as "
                           "--model and the patch with --patch")
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
        theirs = _config_family(cfg)
        mismatch = theirs is not None and theirs != family
        if theirs is None:  # a width we do not know: the pipeline class still tells XL apart
            xl = "XL" in str(json.loads((cfg / "model_index.json").read_text()).get("_class_name"))
            theirs, mismatch = ("sdxl" if xl else "sd1/sd2"), xl != (family == "sdxl")
        if mismatch:
            raise FmnError(f"--config {config} is a {theirs} pipeline but {path.name} is a "
                           f"{family} checkpoint: pass a config folder of the same family")
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


def _config_family(folder: Path) -> str | None:
    """sd1 / sd2 / sdxl from a pipeline folder's UNet config (None when it does not say)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    width = unet.get("cross_attention_dim")
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width if isinstance(width, int) else -1)


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


def save_single_file(pipe, path: str | Path) -> Path:
    """The pipeline as one LDM-layout .safetensors file (see `single_file`)."""
    from forget_me_not.single_file import save_single_file as save

    return save(pipe, path)
