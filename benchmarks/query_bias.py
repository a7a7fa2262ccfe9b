"""What a patch's change of the cross-attention queries does to each prompt's attention logits.

A rank-one change u v^T of a to_q weight adds (v . x) (u . k_j) / sqrt(d) to the logit of
token j at an image position with features x, where k_j is token j's key. Read per token for
a few prompts, u . k_j tells whether the change singles out the concept's word (large at its
position only) or moves every prompt's attention between the same positions (the start token,
the padding, the last content words), which the softmax does not cancel. Prints, per layer and
prompt, u . k_j at every token up to the end token and the mean over the padding, with the
share of the change's energy in its first direction; writes the same as JSON.

    python benchmarks/query_bias.py runs/s12/base_star.safetensors --out DIR \
        --prompt "a photo of a star" --prompt "a square" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from forget_me_not.files import write_atomic
from forget_me_not.models import load_pipeline
from forget_me_not.patch import load_patch

PROMPTS = ("a photo of a star", "a photo of a square", "a square", "a triangle",
           "a photo in the style of dotted", "a photo of a moon", "a red circle in striped style",
           "")


def query_deltas(patch) -> dict[str, torch.Tensor]:
    """Each to_q layer's full change, by module name (a LoRA's as its delta form)."""
    return {k[len("unet."):-len(".weight")]: v.float() for k, v in patch.to_delta().tensors.items()
            if k.endswith("to_q.weight")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patch")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt to read (repeatable; default: a star, its neighbours, empty)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if not Path(a.patch).is_file():
        raise SystemExit(f"no patch file {a.patch}: pass a .safetensors patch from fmn forget")
    patch = load_patch(a.patch)
    deltas = query_deltas(patch)
    if not deltas:
        raise SystemExit(f"{a.patch} changes no to_q weight: nothing to read")
    prompts = list(a.prompt or PROMPTS)
    pipe = load_pipeline("embedded")
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    lengths = [len(tok(x).input_ids) for x in prompts]  # start and end tokens included
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    modules = dict(pipe.unet.named_modules())
    report = {}
    for name, delta in sorted(deltas.items()):
        u_mat, sing, _ = torch.linalg.svd(delta)
        u = u_mat[:, 0] * sing[0]
        with torch.no_grad():
            keys = states @ modules[name.replace("to_q", "to_k")].weight.T  # (P, T, d)
            bias = keys @ u  # (P, T)
        rows = {}
        print(f"{name}: first direction {float(sing[0] ** 2 / sing.pow(2).sum()):.1%} of the "
              "change's energy")
        for i, text in enumerate(prompts):
            words = [round(float(x), 2) for x in bias[i, : lengths[i]]]
            pad = round(float(bias[i, lengths[i]:].mean()), 2)
            rows[text] = {"tokens": words, "padding_mean": pad}
            print(f"  {text!r:34s} {words} padding {pad}")
        report[name] = {"first_direction_share": float(sing[0] ** 2 / sing.pow(2).sum()),
                        "prompts": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"patch": a.patch, "layers": report}, indent=1)
    write_atomic(a.out / "query_bias.json", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
