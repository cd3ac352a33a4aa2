"""``kubetune-preflight JOB.yaml``: the pre-flight pod, on CPU, before any GPU is asked for.

It runs what a training pod runs first, on every row: the recipe's checks, the model's config
and tokenizer (an hf:// model's weights stay on the Hub), every row read, templated, tokenized,
masked and packed into the prepared-rows cache (``KUBETUNE_PREPARED_DIR``: on the job's
pvc:// output, where the training pods find them; with an object-store output, also put in
the store, which training pods read first), then the memory estimate from the real
config against ``KUBETUNE_GPU_MEMORY`` bytes and the training time. The report goes to
/dev/termination-log as ``{"preflight": {...}}`` (the operator reads it into
status.preflight); exit 0 when it passed, 2 when the data or the memory did not.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.errors import EXIT_PERMANENT, EXIT_RETRYABLE, KubetuneError

from kubetune_trainer.config import RunContext

GIB = 2**30
MAX_MESSAGE = 3000  # the pod's termination message holds 4096 bytes


def check(job: FineTuneJob, ctx: RunContext, *, gpu_memory: float | None = None, log=print
          ) -> dict[str, Any]:
    """The report (status.preflight's fields). A KubetuneError (bad data, a model that does
    not fit) propagates, naming its field."""
    import numpy as np
    from kubetune.estimate import fits, training_time

    from kubetune_trainer.data import cache
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.train import model_path, preflight, prepare_data

    spec = job.spec
    rec = preflight(spec, on_gpu=False)
    path = model_path(spec, ctx, light=True)
    tokenizer = load_tokenizer(path, spec)
    data = prepare_data(spec, ctx, tokenizer, rec, log=log)
    stats = data.stats
    report: dict[str, Any] = {
        "passed": True, "rows": stats.get("rows"), "badRows": stats.get("bad_rows"),
        "badReasons": list(stats.get("bad_reasons") or [])[:5],
        "sequences": stats.get("sequences", len(data.train)),
        "tokens": stats.get("tokens"), "trainedTokens": stats.get("trained_tokens"),
        "truncated": stats.get("truncated"),
        "prepared": cache.key(spec, ctx, tokenizer, None) is not None
        and (cache.shared_dir(ctx) is not None or bool(stats.get("shared")))}
    if "input_ids" in data.train.column_names:
        lengths = np.array([len(ids) for ids in data.train["input_ids"]])
        if len(lengths):
            report["rowLengthPercentiles"] = {
                f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {
                "max": int(lengths.max())}
    config = json.loads((path / "config.json").read_text())
    verdict = fits(config, spec, gpu_memory)
    report["memoryPerGpu"] = f"{verdict.estimate.total / GIB:.1f} GiB"
    if gpu_memory:
        report["gpuMemory"] = f"{gpu_memory / GIB:.1f} GiB"
    if verdict.fits is False:
        raise KubetuneError(verdict.message(), field="spec.resources")
    tokens = stats.get("tokens") or 0
    seconds, assumed = training_time(verdict.estimate.params, tokens,
                                     report["sequences"] or 0, spec)
    report.update(estimatedSeconds=seconds, assumptions=assumed)
    report["message"] = (f"{report['rows']} rows ({report['badRows']} unusable), "
                         f"{report['sequences']} sequences, {tokens} tokens; "
                         f"{verdict.message()}")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from kubetune.jobfile import load_job

    p = argparse.ArgumentParser(prog="kubetune-preflight", description=__doc__.split("\n")[0])
    p.add_argument("job", help="FineTuneJob YAML (the operator mounts it from a ConfigMap)")
    p.add_argument("--pvc-root", default="/mnt/pvc", help="where pvc:// claims are mounted")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = os.environ.get("KUBETUNE_GPU_MEMORY")
    try:
        job = load_job(args.job)
        ctx = RunContext(base_dir=Path(args.job).resolve().parent, pvc_root=Path(args.pvc_root))
        report = check(job, ctx, gpu_memory=float(raw) if raw else None)
        code = 0
    except KubetuneError as err:
        report = {"passed": False, "reason": err.reason, "field": err.field,
                  "message": err.message}
        code = EXIT_PERMANENT
    except Exception as exc:  # noqa: BLE001 - a crash is retried by the Job, said here
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    print(json.dumps({"preflight": report}, indent=1), flush=True)
    _termination_message(report)
    return code


def _termination_message(report: dict[str, Any]) -> None:
    from kubetune_trainer.train import termination_log

    report = dict(report)
    report["message"] = (report.get("message") or "")[:MAX_MESSAGE]
    report["badReasons"] = [r[:200] for r in report.get("badReasons") or []]
    termination_log({"preflight": report})


if __name__ == "__main__":
    sys.exit(main())
