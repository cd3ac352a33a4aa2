"""``kubetune validate``: what a run checks before training, on a sample, without training.

The same shell functions and recipe as a run (``train.py``), so a job that validates gets
past data preparation in the pod.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob

from kubetune_trainer.config import RunContext

SAMPLE = 200


def preflight_all(job: FineTuneJob, ctx: RunContext, gpu_memory: float | None = None
                  ) -> Iterator[str]:
    """What a run checks first, as lines; the memory estimate last, and a KubetuneError when
    it does not fit ``gpu_memory`` bytes (default: resources.gpuMemory)."""
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.train import model_path, output_root, preflight, prepare_data

    spec = job.spec
    rec = preflight(spec)
    from kubetune_trainer.storage import Store

    store = Store.for_output(spec)
    yield store.check() if store else f"output: {output_root(spec, ctx)}"
    lines: list[str] = []
    path = model_path(spec, ctx, light=True)  # an hf:// model's weights stay on the Hub
    tokenizer = load_tokenizer(path, spec)
    data = prepare_data(spec, ctx, tokenizer, rec, log=lines.append, limit=SAMPLE)
    yield from lines
    rows = min(SAMPLE, data.stats["rows"])
    yield (f"model: {path}; template renders; stage {spec.stage}: the first {rows} rows give"
           f" {len(data.train)} training rows"
           + (f" and {len(data.eval)} eval rows" if data.eval is not None else ""))
    yield memory_check(path / "config.json", spec, gpu_memory)


def memory_check(config: Path, spec: Any, gpu_memory: float | None = None) -> str:
    """The estimate as one line; a KubetuneError (the numbers and the cheapest fixes) when it
    does not fit ``gpu_memory`` bytes per GPU, or resources.gpuMemory."""
    import json

    from kubetune.errors import KubetuneError
    from kubetune.estimate import fits, gpu_memory_for

    try:
        verdict = fits(json.loads(config.read_text()), spec,
                       gpu_memory if gpu_memory is not None else gpu_memory_for(spec))
    except (OSError, ValueError) as err:
        return f"memory: not estimated ({err})"
    if verdict.fits is False:
        raise KubetuneError(verdict.message(), field="spec.resources")
    return f"memory: {verdict.message()} (`kubetune estimate` for the parts)"
