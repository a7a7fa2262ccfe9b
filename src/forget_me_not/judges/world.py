"""The ConceptWorld judge: the world's trained classifier behind the common Judge interface."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from forget_me_not.errors import FmnError
from forget_me_not.judges.base import DEFAULT_THRESHOLD, BaseJudge
from forget_me_not.world import vocab
from forget_me_not.world.judge_model import COLOUR_LABELS, HEADS, JudgeNet

if TYPE_CHECKING:
    from PIL import Image

    from forget_me_not.concepts import Concept

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "world" / "weights" / "judge.safetensors"


def load_judge_net(path: Path = DEFAULT_WEIGHTS) -> JudgeNet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise FmnError(
            f"ConceptWorld judge weights not found at {path}; run `fmn world "
            "train-judge` or reinstall forget-me-not"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FmnError(
            f"judge weights {path} are unreadable ({exc}); retrain with `fmn world train-judge`"
        ) from exc
    net = JudgeNet()
    net.load_state_dict(state)
    return net.eval()


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, 32, 32) in [-1, 1]; other sizes are resized to the world's size."""
    from PIL import Image as PILImage

    size = vocab.IMAGE_SIZE
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), PILImage.Resampling.BICUBIC)
        arrays.append(np.asarray(im))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return x.div(127.5).sub(1.0)


class WorldJudge(BaseJudge):
    """Scores any ConceptWorld concept: subjects, styles, colours, unsafe content and the role."""

    name = "world"

    def __init__(
        self, weights: str | Path | None = None, threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        super().__init__(threshold)
        self.net = load_judge_net(Path(weights) if weights else DEFAULT_WEIGHTS)

    def why_not(self, concept: Concept) -> str | None:
        if self._head_and_label(concept.name) is None:
            known = ", ".join(vocab.SUBJECTS + vocab.STYLES + tuple(vocab.COLOURS) + (vocab.ROLE,))
            return (
                f"the world judge knows no concept '{concept.name}'; use one of: {known} "
                "(or --judge clip for real models)"
            )
        return None

    @staticmethod
    def _head_and_label(name: str) -> tuple[str, int] | None:
        name = name.strip().lower()
        if name in vocab.SUBJECTS:
            return "subject", vocab.SUBJECTS.index(name)
        if name in vocab.STYLES:
            return "style", vocab.STYLES.index(name)
        if name in vocab.COLOURS:
            return "colour", COLOUR_LABELS.index(name)
        if name in ("unsafe", "nsfw"):
            return "unsafe", 1
        if name == vocab.ROLE:  # the role as trained: its ID wearing the hat (see `heads`)
            return "subject", vocab.SUBJECTS.index(vocab.ROLE_ID)
        return None

    @torch.no_grad()
    def heads(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Calibrated probabilities of every head: {head: (N, n_labels)}."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
        for i in range(0, len(images), 256):
            probs = self.net.probabilities(images_to_tensor(images[i : i + 256]))
            for k, v in probs.items():
                out[k].append(v.numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    def probabilities(self, images: Sequence[Image.Image], concept: Concept) -> np.ndarray:
        found = self._head_and_label(concept.name)
        if found is None:
            raise FmnError(self.why_not(concept))
        if not images:
            return np.zeros(0)
        head, label = found
        probs = self.heads(images)
        # An image the judge rejects ("none of these") shows no concept, whatever a head says.
        p = probs[head][:, label] * probs["reject"][:, 0]
        if concept.name.strip().lower() == vocab.ROLE:
            p = p * probs["hat"][:, 1]
        return p

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The judge's image features (N, 256), for image-quality distances (KID)."""
        chunks = [self.net.embed(images_to_tensor(images[i : i + 256])).numpy()
                  for i in range(0, len(images), 256)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 256), np.float32)

    def describe(self, images: Sequence[Image.Image]) -> list[dict]:
        """The judge's reading of each image: most likely label and its probability per head."""
        probs = self.heads(images)
        return [
            {k: (HEADS[k][int(v[i].argmax())], float(v[i].max())) for k, v in probs.items()}
            for i in range(len(images))
        ]

    @staticmethod
    def metrics(path: Path = DEFAULT_WEIGHTS) -> dict:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("metrics", "{}"))
