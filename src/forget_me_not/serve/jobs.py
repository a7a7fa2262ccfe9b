"""Forgetting jobs for the web page: one worker thread runs them in turn on the one pipeline, so
two users' patches never mix; each job writes its files into its own folder, whole or not at all.
"""

from __future__ import annotations

import dataclasses
import queue
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from forget_me_not.errors import FmnError

OTHERS = ("circle", "heart", "milka", "striped", "red")  # what the embedded grid also shows


@dataclasses.dataclass
class Job:
    id: str
    client: str
    concept: str
    method: str | None
    recipe: str | None
    status: str = "queued"  # queued | running | done | failed
    stage: str = ""
    done: int = 0
    total: int = 0
    error: str = ""
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None
    folder: Path | None = None

    def public(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("id", "concept", "method", "recipe", "status",
                                              "stage", "done", "total", "error", "scores",
                                              "seconds")}
        if self.status == "done":
            out["grid"] = f"/jobs/{self.id}/grid.png"
            out["patch"] = f"/jobs/{self.id}/patch.safetensors"
        return out


class Jobs:
    """The queue, the worker and what each client is allowed: one job at a time per client."""

    def __init__(self, pipe: Any, family: str, root: Path, n: int = 4, seed: int = 1000) -> None:
        self.pipe, self.family, self.root, self.n, self.seed = pipe, family, root, n, seed
        self.jobs: dict[str, Job] = {}
        self._judge: Any = None  # loaded on the first job, then kept
        self.lock = threading.Lock()
        self.todo: queue.Queue[Job] = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def check(self, concept: str, method: str | None, recipe: str | None) -> None:
        """The checks the CLI makes, before a job is queued (the same one-line messages)."""
        from forget_me_not import api
        from forget_me_not.concepts import Concept, check_known, pipeline_tokenizers

        if not concept.strip():
            raise FmnError("say what to forget: type a concept, e.g. 'star'")
        Concept(concept)
        for tok in pipeline_tokenizers(self.pipe):
            check_known(tok, concept)
        api.plan(self.family, method or None, recipe or None)
        if self.family == "embedded":
            from forget_me_not.presets import is_world_concept

            if not is_world_concept(concept):
                raise FmnError(f"{concept!r} is not a ConceptWorld concept: pick one from the list")

    def submit(self, client: str, concept: str, method: str | None, recipe: str | None) -> Job:
        self.check(concept, method, recipe)
        with self.lock:
            busy = [j for j in self.jobs.values() if j.client == client
                    and j.status in ("queued", "running")]
            if busy:
                raise FmnError(f"a forget of {busy[0].concept!r} is still running for this page: "
                               "wait for it to finish")
            job = Job(uuid.uuid4().hex[:12], client, concept.strip(), method or None,
                      recipe or None)
            self.jobs[job.id] = job
        self.todo.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def _work(self) -> None:
        while True:
            job = self.todo.get()
            try:
                self._run(job)
            except FmnError as err:
                job.status, job.error = "failed", " ".join(str(err).split())
            except Exception as err:  # the page shows a line, the server keeps serving
                job.status, job.error = "failed", f"{type(err).__name__}: {err}"

    def _run(self, job: Job) -> None:
        from forget_me_not.api import forget
        from forget_me_not.progress import listening

        job.status = "running"

        def heard(label: str, done: int, total: int) -> None:
            job.stage, job.done, job.total = label, done, total

        folder = Path(tempfile.mkdtemp(prefix=f"job_{job.id}_", dir=self.root))
        with listening(heard), tempfile.TemporaryDirectory() as refs:
            concept = self._concept(job.concept, Path(refs))
            names = [job.concept] + [o for o in OTHERS if o != job.concept]
            job.stage = "scoring before"
            before = self._score(names, job.concept)
            job.stage = "forgetting"
            started = time.perf_counter()
            patch = forget(self.pipe, concept, method=job.method, recipe=job.recipe,
                           progress=False)
            job.seconds = round(time.perf_counter() - started, 2)
            patch.save(folder / "patch.safetensors")
            patch.apply(self.pipe)
            try:
                job.stage = "scoring after"
                after = self._score(names, job.concept)
            finally:
                patch.remove(self.pipe)
        self._sheet(names, before, after, job, folder)
        job.folder = folder
        job.status = "done"

    def _concept(self, name: str, refs: Path):
        from forget_me_not.concepts import Concept

        if self.family == "embedded":
            from forget_me_not.presets import world_concepts

            return world_concepts([name], refs)[0]
        return Concept(name)

    def _score(self, names: list[str], target: str) -> dict[str, dict]:
        if self.family == "embedded":
            from forget_me_not.judges.world import WorldJudge
            from forget_me_not.world.defaults import default_guidance
            from forget_me_not.world.scoring import score_concepts

            if self._judge is None:
                self._judge = WorldJudge()
            return score_concepts(self.pipe, self._judge, names, n=self.n, seed=self.seed,
                                  guidance=default_guidance(self.pipe), progress=False,
                                  avoid=[target])
        from forget_me_not.generation import generate_images

        return {target: {"rate": None, "images": generate_images(
            self.pipe, f"a photo of {target}", n=self.n, seed=self.seed)}}

    def _sheet(self, names, before, after, job: Job, folder: Path) -> None:
        from forget_me_not.demo import before_after_sheet
        from forget_me_not.images import labelled_grid, save_png

        shown = [n for n in names if n in before]
        job.scores = {n: {"before": before[n]["rate"], "after": after[n]["rate"]} for n in shown}
        if any(before[n]["rate"] is None for n in shown):  # no judge for this model: images
            cells = before[job.concept]["images"] + after[job.concept]["images"]
            k = len(before[job.concept]["images"])
            sheet = labelled_grid(cells, ["before"] + [""] * (k - 1) + ["after"] + [""] * (k - 1),
                                  cols=k, title=f"Forgetting '{job.concept}' (no judge)")
        else:
            sheet = before_after_sheet(shown, before, after, job.concept)
        save_png(sheet, folder / "grid.png")
