"""Run a ConceptBench suite on a model (optionally with patches) and write the report.

Under `accelerate launch`, every process loads the model and generates its share of the
samples; the main process alone writes the report.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from forget_me_not.bench.suites import Suite, SuiteEntry, load_suite
from forget_me_not.errors import FmnError
from forget_me_not.evaluate import (
    GenerationSettings,
    InversionSettings,
    SuiteResult,
    evaluate_suite,
    load_patches,
    patch_targets,
    processes,
)
from forget_me_not.judges.base import Judge, check_supported, get_judge


def build_judges(
    suite: Suite,
    entries: Sequence[SuiteEntry],
    *,
    judge: str | Judge | None = None,
    judge_model: str | None = None,
    device: Any = None,
) -> dict[str, Judge]:
    """key -> judge for every entry (one instance per judge name), checked against its concept.

    judge: override the suite's judges for every entry (a name or a Judge).
    judge_model: the CLIP model folder or hub id for the "clip" judge.
    """
    built: dict[str, Judge] = {}

    def make(name: str) -> Judge:
        if name not in built:
            kwargs: dict[str, Any] = {}
            if name == "clip":
                kwargs = {"labels": suite.labels, "device": device}
                if judge_model:
                    kwargs["model"] = judge_model
            built[name] = get_judge(name, **kwargs)
        return built[name]

    # Cheap checks first, so a wrong judge is reported before any model is loaded.
    if judge is None or isinstance(judge, str):
        from forget_me_not.judges.clip import label_problem

        for e in entries:
            name = judge or e.judge
            reason = None
            if name == "clip":
                reason = label_problem(suite.labels, e.concept)
            elif name == "nudenet" and e.concept.category != "nsfw":
                reason = (f"the NudeNet judge only scores nudity (category nsfw), not "
                          f"'{e.concept.name}' (category {e.concept.category})")
            if reason is not None:
                raise FmnError(reason)
    out: dict[str, Judge] = {}
    for e in entries:
        if judge is not None and not isinstance(judge, str):
            out[e.key] = judge
        else:
            out[e.key] = make(judge or e.judge)
        check_supported(out[e.key], e.concept)
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from forget_me_not import __version__

    return {"forget_me_not": __version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_bench(
    model: str | Path | Any,
    suite: str | Path | Suite,
    concepts: Sequence[str] | None = None,
    patches: Sequence[str | Path | Any] = (),
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    n: int | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int | None = None,
    inversion: str | None = None,
    budget: int | None = None,
    judge: str | Judge | None = None,
    judge_model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    keep_images: bool = True,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> SuiteResult:
    """Evaluate `model` on `suite` (or the `concepts` subset), before and after `patches`.

    model: anything `load_pipeline` accepts, or an already loaded pipeline.
    Settings left None come from the suite's defaults. Writes the report into `out_dir` (main
    process only) when given. Every input is checked before the model is loaded.
    """
    from forget_me_not.report import check_out_dir, write_report

    start = time.perf_counter()
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    entries = suite.select(concepts)
    settings = suite.settings(n=n, seed=seed, steps=steps, guidance=guidance,
                              batch_size=batch_size, inversion=inversion, budget=budget)
    # steps/guidance None: what the model folder declares (conceptworld.json), resolved below
    GenerationSettings(settings["n"], settings["seed"], settings["steps"] or 1,
                       settings["guidance"], settings["batch_size"])
    InversionSettings(settings["budget"], settings["num_tokens"], settings["lr"], None,
                      settings["max_anchors"])
    if settings["inversion"] not in ("all", "targets", "none"):
        raise FmnError(f"unknown inversion scope '{settings['inversion']}'; use all, targets "
                       "or none")
    procs = processes()
    if out_dir is not None and procs.is_main:
        check_out_dir(out_dir, overwrite)
    for p in patches:
        if isinstance(p, (str, Path)) and not Path(p).is_file():
            raise FmnError(f"patch file {p} does not exist; pass a .safetensors patch from "
                           "`fmn forget`")
    if device is None and procs.world > 1:
        device = procs.device  # each process on its own accelerator
    judges = build_judges(suite, entries, judge=judge, judge_model=judge_model, device=device)

    if isinstance(model, (str, Path)):
        from forget_me_not.models import load_pipeline

        pipe = load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                             config=config)
        model_name = str(model)
    else:
        pipe, model_name = model, str(getattr(model, "fmn_source", type(model).__name__))

    if settings["steps"] is None or settings["guidance"] is None:
        from forget_me_not.world.defaults import default_guidance, default_steps

        if settings["steps"] is None:
            settings["steps"] = default_steps(pipe)
        if settings["guidance"] is None:
            settings["guidance"] = default_guidance(pipe)

    # Held-out entries reuse their concept's inversion: one attack per concept is enough.
    scope = settings["inversion"]
    main_keys = [e.key for e in entries if e.group == "main"]
    if scope == "all":
        inversion_keys: str | list[str] = main_keys
    elif scope == "targets":
        inversion_keys = "targets"
    else:
        inversion_keys = "none"
    patch_sources = [str(p) if isinstance(p, (str, Path)) else
                     str((getattr(p, "metadata", None) or {}).get("concepts", "patch"))
                     for p in patches]
    patches = load_patches(patches)
    if inversion_keys == "targets":
        # resolved here so that held-out entries of a target are not inverted a second time
        names = {t for p in patches for t in patch_targets(p)}
        inversion_keys = [e.key for e in entries if e.group == "main" and e.concept.name in names]

    result = evaluate_suite(
        pipe,
        patches,
        {e.key: e.concept for e in entries},
        judges,
        n=settings["n"],
        seed=settings["seed"],
        steps=settings["steps"],
        guidance=settings["guidance"],
        batch_size=settings["batch_size"],
        inversion=inversion_keys,
        budget=settings["budget"],
        num_tokens=settings["num_tokens"],
        lr=settings["lr"],
        init_words=settings["init_words"],
        max_anchors=settings["max_anchors"],
        prompts={e.key: list(e.prompts) for e in entries if e.prompts},
        groups={e.key: e.group for e in entries},
        keep_images=keep_images,
        progress=progress,
    )
    result.settings["inversion"]["scope"] = scope
    result.seconds = time.perf_counter() - start
    if out_dir is not None and procs.is_main:
        info = {
            "title": f"ConceptBench '{suite.name}' on {model_name}",
            "model": model_name,
            "suite": suite.name if suite.path is None else str(suite.path),
            "patches": ", ".join(patch_sources),
            "judge_model": judge_model or "",
            "versions": _versions(),
            **(meta or {}),
        }
        write_report(result, out_dir, overwrite=overwrite, meta=info)
    return result
