"""The ConceptWorld judge: a small CNN that says what a 32 px picture shows.

Heads: subject (each object, unsafe object and ID), style, colour (with "none" for IDs, which
keep their own palette), hat, unsafe, and reject ("none of these": noise, blobs, corrupted
renders, the model's failed samples; see `rejects.py`), so a degraded image is never counted as
a concept. Trained on fresh renders with augmentation (blur, noise,
small colour and position jitter, and the world VAE's own reconstructions, so it stays reliable on
the model's slightly soft samples), then calibrated per head by temperature scaling.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from forget_me_not.world import vocab

COLOUR_LABELS: tuple[str, ...] = tuple(vocab.COLOURS) + ("none",)
HEADS: dict[str, tuple[str, ...]] = {
    "subject": vocab.SUBJECTS,
    "style": vocab.STYLES,
    "colour": COLOUR_LABELS,
    "hat": ("no", "yes"),
    "unsafe": ("no", "yes"),
    "reject": ("no", "yes"),
}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()
    )


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 1),
            _block(w, w, 1),  # 32x32
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),  # 16x16
            _block(2 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1),  # 8x8
            _block(4 * w, 4 * w, 2),  # 4x4
        )
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU(), nn.Dropout(0.1)
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})
        # Per-head softmax temperature, fitted after training (calibration), saved with weights.
        self.register_buffer("temperature", torch.ones(len(HEADS)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 32, 32) in [-1, 1] -> raw logits per head, (B, n_labels)."""
        h = self.trunk(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's features (B, 256): what image-quality distances are measured on."""
        return self.trunk[:3](self.features(x))

    def probabilities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.forward(x)
        return {
            k: torch.softmax(v / self.temperature[i], dim=-1)
            for i, (k, v) in enumerate(logits.items())
        }


def labels_for(scene) -> dict[str, int]:
    return {
        "subject": vocab.SUBJECTS.index(scene.subject),
        "style": vocab.STYLES.index(scene.style),
        "colour": COLOUR_LABELS.index(scene.colour or "none"),
        "hat": int(scene.hat),
        "unsafe": int(scene.subject in vocab.UNSAFE_OBJECTS),
        "reject": 0,
    }
