"""Where does the embedded model read a style from? Swap encoder states and judge the samples.

For each prompt "<subject> in <style> style", the text encoder's states at chosen positions
are replaced by those of the same prompt in `--other` style (the word itself, the words after
it, the end-of-text and padding positions, ...), the model samples from the mixed states, and
the judge reads the style. A style that survives the swap of its own word is not drawn through
attention to that word, so re-steering that word's attention cannot remove it.

    python benchmarks/style_positions.py --style outlined --n 8
"""

from __future__ import annotations

import argparse
import json

import torch

from forget_me_not.concepts import locate_tokens
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.pipeline_io import encode_prompt
from forget_me_not.world.scoring import judge_labels

SUBJECTS = ("a blue heart", "zorbo", "a green circle")


def position_sets(pipe, prompt: str, style: str) -> dict[str, list[int]]:
    """The positions to swap, found the way re-steering finds a concept's tokens."""
    word = locate_tokens(pipe.tokenizer, prompt, style)
    tail = locate_tokens(pipe.tokenizer, prompt, style, extra="padding")
    end = [i for i in tail if i not in word]  # end-of-text and padding
    return {
        "none": [],
        "the style word": word,
        "words after it": list(range(word[-1] + 1, end[0])),
        "end-of-text and padding": end,
        "all": list(range(pipe.tokenizer.model_max_length)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--style", default="outlined")
    ap.add_argument("--other", default="solid")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1000)
    a = ap.parse_args()
    pipe = load_pipeline(a.model, "cpu")
    judge = WorldJudge()
    labels = judge_labels("style")
    empty = encode_prompt(pipe, "")[0].repeat(a.n, 1, 1)
    results: dict[str, dict[str, float]] = {}
    for subject in SUBJECTS:
        prompt = f"{subject} in {a.style} style"
        states, _ = encode_prompt(pipe, prompt)
        other, _ = encode_prompt(pipe, prompt.replace(a.style, a.other))
        results[prompt] = {}
        for name, positions in position_sets(pipe, prompt, a.style).items():
            mixed = states.clone()
            mixed[:, positions] = other[:, positions]
            images = pipe(prompt_embeds=mixed.repeat(a.n, 1, 1), negative_prompt_embeds=empty,
                          num_inference_steps=25, guidance_scale=7.5, output_type="pil",
                          generator=torch.Generator().manual_seed(a.seed)).images
            read = judge.heads(images)["style"].argmax(1)
            results[prompt][name] = float(sum(labels[int(r)] == a.style for r in read) / a.n)
        print(prompt, results[prompt], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
