"""Drawing a concept's samples (data-parallel under `accelerate`) and judging them: G."""

from __future__ import annotations

import atexit
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from forget_me_not.errors import FmnError
from forget_me_not.judges.base import Judge, check_supported
from forget_me_not.scores import RecognitionScore

if TYPE_CHECKING:
    from forget_me_not.concepts import Concept




# -- data parallelism ----------------------------------------------------------------------------
class _Processes:
    """This process's place among `accelerate launch` processes (one process when not launched)."""

    def __init__(self) -> None:
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # Without CUDA, accelerate only forms a process group when told to use the CPU.
            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = state.process_index, state.num_processes
            self.device = "cpu" if state.device.type == "cpu" else str(state.device)
            _leave_at_exit(state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's `items`, concatenated in rank order, on every process."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return list(gather_object(items))

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj` on every process."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


_LEAVING: list[Any] = []


def _leave_at_exit(state: Any) -> None:
    """Close the process group before exit: a process that exits with gloo's threads still
    running is aborted ("terminate called without an active exception")."""
    if not _LEAVING:
        _LEAVING.append(state)
        atexit.register(lambda: (state.wait_for_everyone(), state.destroy_process_group()))


def processes() -> _Processes:
    return _Processes()


# -- generation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    """How samples are drawn; the same settings before and after give the same seeds."""

    n: int = 32  # samples per concept
    seed: int = 0  # sample i uses seed + i
    steps: int = 25  # denoising steps
    guidance: float | None = None  # None: the pipeline's default guidance scale
    batch_size: int = 8
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise FmnError(f"number of samples must be positive, got {self.n}; pass e.g. --n 32")
        if self.steps <= 0:
            raise FmnError(f"denoising steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise FmnError(f"batch size must be positive, got {self.batch_size}")
        if self.guidance is not None and self.guidance < 0:
            raise FmnError(f"guidance scale must be >= 0, got {self.guidance}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_plan(prompts: Sequence[str], n: int, seed: int) -> tuple[list[str], list[int]]:
    """Sample i: prompt i mod len(prompts), seed seed + i."""
    if not prompts:
        raise FmnError("a concept needs at least one prompt to generate from")
    return [prompts[i % len(prompts)] for i in range(n)], [seed + i for i in range(n)]


def generate_samples(pipe: Any, prompts: Sequence[str], seeds: Sequence[int],
                     gen: GenerationSettings):
    kwargs: dict[str, Any] = {"num_inference_steps": gen.steps, "output_type": "pil"}
    if gen.guidance is not None:
        kwargs["guidance_scale"] = gen.guidance
    if gen.height is not None:
        kwargs["height"] = gen.height
    if gen.width is not None:
        kwargs["width"] = gen.width
    # One CPU generator per sample: the noise of sample i depends only on its seed, not on the
    # batch it lands in or the device the model runs on.
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        return list(pipe(prompt=list(prompts), generator=generators, **kwargs).images)


@contextmanager
def quiet(pipe: Any) -> Iterator[None]:
    old = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = old


def recognition_score(
    pipe: Any,
    concept: Concept,
    judge: Judge,
    prompts: Sequence[str],
    gen: GenerationSettings,
    *,
    desc: str = "",
    progress: bool = False,
    keep_images: bool = True,
) -> RecognitionScore:
    """Generate gen.n images from `prompts` (cycled) with fixed seeds and judge them as `concept`.

    Under accelerate, whole batches are dealt round-robin to processes and gathered back in
    sample order on every process.
    """
    procs = processes()
    all_prompts, all_seeds = sample_plan(prompts, gen.n, gen.seed)
    batches = [range(k, min(k + gen.batch_size, gen.n)) for k in range(0, gen.n, gen.batch_size)]
    mine = batches[procs.rank :: procs.world]
    start = time.perf_counter()
    rows: list[tuple[int, Image.Image, float]] = []
    bar = tqdm(
        total=sum(len(b) for b in mine), desc=desc, leave=False, unit="img",
        disable=not (progress and procs.is_main),
    )
    with quiet(pipe), bar:
        for batch in mine:
            images = generate_samples(pipe, [all_prompts[i] for i in batch],
                                      [all_seeds[i] for i in batch], gen)
            probs = np.asarray(judge.probabilities(images, concept), dtype=np.float64)
            if probs.shape != (len(images),):
                raise FmnError(
                    f"judge '{judge.name}' returned {probs.shape} probabilities for "
                    f"{len(images)} images; a judge must return one per image"
                )
            rows.extend(zip(batch, images, probs.tolist(), strict=True))
            bar.update(len(batch))
    rows = sorted(procs.gather(rows), key=lambda r: r[0])
    probs = np.array([r[2] for r in rows], dtype=np.float64)
    recognised = probs >= getattr(judge, "threshold", 0.5)
    return RecognitionScore(
        rate=float(recognised.mean()),
        probabilities=probs,
        recognised=recognised,
        prompts=all_prompts,
        seeds=all_seeds,
        images=[r[1] for r in rows] if keep_images else [],
        seconds=time.perf_counter() - start,
    )


def generation_score(
    pipe: Any,
    concept: Concept,
    judge: Judge,
    *,
    n: int = 32,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = False,
) -> RecognitionScore:
    """G(c): the judge's recognition rate over n images from c's prompts, seeds seed + i."""
    check_supported(judge, concept)
    gen = GenerationSettings(n, seed, steps, guidance, batch_size, height, width)
    return recognition_score(pipe, concept, judge, prompts or concept.prompts(), gen,
                             desc=f"G {concept.name}", progress=progress)
