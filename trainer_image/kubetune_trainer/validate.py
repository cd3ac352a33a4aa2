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


def preflight_all(job: FineTuneJob, ctx: RunContext) -> Iterator[str]:
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.train import model_path, output_root, preflight, prepare_data

    spec = job.spec
    rec = preflight(spec)
    from kubetune_trainer.storage import Store

    store = Store.for_output(spec)
    yield store.check() if store else f"output: {output_root(spec, ctx)}"
    lines: list[str] = []
    path = model_path(spec, ctx)
    tokenizer = load_tokenizer(path, spec)
    data = prepare_data(spec, ctx, tokenizer, rec, log=lines.append, limit=SAMPLE)
    yield from lines
    rows = min(SAMPLE, data.stats["rows"])
    yield _memory_line(path / "config.json", spec)
    yield (f"model: {path}; template renders; stage {spec.stage}: the first {rows} rows give"
           f" {len(data.train)} training rows"
           + (f" and {len(data.eval)} eval rows" if data.eval is not None else ""))


def _memory_line(config: Path, spec: Any) -> str:
    import json

    from kubetune.estimate import GIB, estimate

    try:
        est = estimate(json.loads(config.read_text()), spec)
    except (OSError, ValueError) as err:
        return f"memory: not estimated ({err})"
    return (f"memory: about {est.total / GIB:.1f} GiB per GPU "
            "(`kubetune estimate` for the parts)")
