"""UCE at real shapes on the CPU: seconds per concept and per 10 concepts in one solve.

Random-weight UNet and text encoder(s) at SD 1.5 and SDXL sizes (the closed form's cost depends
on the shapes, not the values); the tokenizer is the embedded model's, whose words serve as
concepts. The load and the model construction are excluded; the timed part is `uce.train`
(text states, one solve per to_k/to_v, the LoRA factors).

    python benchmarks/uce_speed.py --shapes sd15 sdxl --json runs/uce_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from resteer_speed import SD15, SDXL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from forget_me_not.concepts import Concept
from forget_me_not.methods.uce.config import UceConfig
from forget_me_not.methods.uce.train import train
from forget_me_not.models import embedded_model_dir

WORDS = ("star", "moon", "heart", "circle", "square", "triangle", "cross", "arrow", "skull", "gun")


def _text(tokenizer, hidden: int, layers: int, heads: int, projection: bool = False):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build(shape: str):
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(embedded_model_dir() / "tokenizer")
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=16)
    sched = DDIMScheduler(steps_offset=1)
    if shape == "sd15":
        return StableDiffusionPipeline(vae, _text(tok, 768, 12, 12), tok,
                                       UNet2DConditionModel(**SD15).eval(), sched, None, None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae, _text(tok, 768, 12, 12), _text(tok, 1280, 32, 20, True),
                                     tok, tok, UNet2DConditionModel(**SDXL).eval(), sched)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("runs/uce_speed.json"))
    a = ap.parse_args()
    rows = []
    for shape in a.shapes:
        t0 = time.perf_counter()
        pipe = build(shape)
        built = time.perf_counter() - t0
        for count in (1, 10):
            concepts = [Concept(w) for w in WORDS[:count]]
            times = []
            for _ in range(a.repeats):
                t1 = time.perf_counter()
                patch = train(pipe, concepts, UceConfig(preserve_set="common"), progress=False)
                times.append(time.perf_counter() - t1)
            row = {"shape": shape, "concepts": count, "seconds_best": min(times),
                   "seconds_all": times, "rank": patch.rank, "layers": len(patch.tensors) // 2,
                   "reconstruction_error": patch.metadata["reconstruction_error"],
                   "build_seconds": built}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del pipe
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                                  "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
