"""A trial, not a shipped method: UCE's closed form re-solved with the states of tokens learnt
by textual inversion on the edited model (the attack as the M-Score runs it: one token, 150
steps at lr 1e-3, the concept's reference images), round after round.

Each round learns a token on the current edit, adds its tail states in each of the concept's
templates to the erased states (guided as the concept's own), and solves UCE again from the
base weights with `conceptworld-uce`'s settings and preserved states. Prints one JSON line:
G, inversion and adversarial search (16 samples, seeds 1000+, budget 150), the three lowest
retentions, the rank and the seconds the rounds took. With --search, each round also runs the
adversarial prompt search on the current edit (4 tokens, budget 150) and adds the concept's
tail states after the found tokens.

    python benchmarks/uce_inversion_rounds.py star --rounds 3 --threads 1 [--search]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from forget_me_not import recipes
from forget_me_not.attacks import AttackSettings
from forget_me_not.attacks.adversarial import _pixels, _vocabulary, marked, prefix_hook, search
from forget_me_not.attacks.base import anchors_for
from forget_me_not.attacks.report import attack_all
from forget_me_not.data import model_resolution
from forget_me_not.evaluate import applied
from forget_me_not.inversion import train_inversion
from forget_me_not.judges.world import WorldJudge
from forget_me_not.methods.uce.edit import System, low_rank_edit
from forget_me_not.methods.uce.train import (
    Encoded,
    base_metadata,
    edited_layers,
    factors_patch,
    solve_states,
    tail_states,
)
from forget_me_not.models import load_pipeline
from forget_me_not.presets import world_concepts
from forget_me_not.world import concepts as wc
from forget_me_not.world.scoring import score_concepts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("target")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search", action="store_true", help="also the adversarial search's states")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("embedded")
    judge = WorldJudge()
    config = recipes.load("conceptworld-uce").configs(False)[0]
    with tempfile.TemporaryDirectory() as tmp:
        concepts = world_concepts([a.target], Path(tmp))
        concept = concepts[0]
        states = solve_states(pipe, concepts, config)
        layers = edited_layers(pipe, config.targets)
        erased, guides = [states.erased], [states.guides]

        def solve():
            system = System(torch.cat(erased), torch.cat(guides), states.preserved,
                            config.erase_scale, config.preserve_scale, config.lamb)
            factors = {name: low_rank_edit(module.weight, system) for name, module in layers}
            meta = {**base_metadata(pipe, concepts, config, states.kept), "edited_states": 0}
            return factors_patch(factors, meta, config, concepts)

        patch = solve()
        started = time.perf_counter()
        anchor = concept.anchor or ""
        for r in range(a.rounds):
            with applied(pipe, [patch]):
                token = train_inversion(pipe, list(concept.images), num_tokens=1, steps=a.steps,
                                        lr=1e-3, seed=100 + r, templates=concept.templates,
                                        progress=False)
            encoded = Encoded(pipe)
            for t in concept.templates:
                own, target = tail_states(pipe, t.format(token.phrase), t.format(anchor).strip(),
                                          token.phrase, anchor, encoded)
                erased.append(own)
                guides.append(target)
            if a.search:
                k = AttackSettings().adversarial_tokens
                anchors = anchors_for(concept, AttackSettings().max_anchors, None)
                pixels = _pixels(anchors, model_resolution(pipe))
                found = search(pipe, [patch], list(concept.prompts()), pixels, num_tokens=k,
                               budget=150, lr=AttackSettings().adversarial_lr, seed=200 + r)
                tables, _ = _vocabulary(pipe)
                ids = torch.tensor(found.token_ids)
                with prefix_hook(pipe, k, [table[ids] for table in tables]):
                    encoded = Encoded(pipe)  # the found tokens in front of every prompt
                    for t in concept.templates:
                        own, target = tail_states(pipe, marked(t.format(concept.words), k),
                                                  marked(t.format(anchor).strip(), k),
                                                  concept.words, anchor, encoded)
                        erased.append(own)
                        guides.append(target)
            patch = solve()
        seconds = time.perf_counter() - started
        names = [c.name for c in wc.all_concepts()]
        base = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
        with applied(pipe, [patch]):
            after = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
        kept = {k: after[k]["rate"] / base[k]["rate"] for k in names
                if k != a.target and base[k]["rate"] > 0}
        result = attack_all(pipe, [patch], concept, judge, ["inversion", "adversarial"],
                            AttackSettings(n=a.n, budget=150))
        print(json.dumps({"target": a.target, "rounds": a.rounds, "search": a.search,
                          "G": result["g"],
                          **{k: v.rate for k, v in result["attacks"].items()},
                          "lowest_retention": sorted(kept.items(), key=lambda kv: kv[1])[:3],
                          "rank": patch.metadata["rank"], "rounds_s": round(seconds, 1)}))


if __name__ == "__main__":
    main()
