"""A patch file's tensors as one short digest, to show that a change keeps the same patch bits.

sha256 over every tensor's key, dtype and raw bytes in key order, first 16 hex digits (the file's
metadata holds its run time, so whole-file hashes differ from run to run).

    fmn forget --concept star --recipe conceptworld-robust --set fmn.steps=3 --out star.safetensors
    python benchmarks/patch_digest.py star.safetensors
"""

from __future__ import annotations

import hashlib
import sys

import torch
from safetensors.torch import load_file


def digest(path: str) -> str:
    tensors = load_file(path)
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(digest(path), path)
