"""The ``kubetune`` command. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from kubetune.errors import KubetuneError


class _Guarded(typer.Typer):
    """Every command is guarded: a KubetuneError prints its message (exit 2), anything else
    one line and the file its traceback went to (exit 1), never a screen of traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
        register = super().command

        def wrap(f: Callable) -> Callable:
            # --help wraps the text to the terminal: the docstring's own line breaks would
            # break sentences in the middle ("its data, without / training").
            doc = kwargs.get("help") or f.__doc__
            register(*args, **{**kwargs, "help": _unwrapped(doc)})(_guarded(f))
            return f

        return wrap


def _unwrapped(doc: str | None) -> str | None:
    """A docstring with each paragraph on one line."""
    import inspect

    if not doc:
        return doc
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def _guarded(f: Callable) -> Callable:
    import click

    @functools.wraps(f)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort,
                click.ClickException):
            raise
        except KubetuneError as e:
            _fail(e)
        except Exception as e:  # the one place that turns any error into a line
            _unexpected(e)

    return guarded


app = _Guarded(no_args_is_help=True, add_completion=False,
               help="Fine-tune LLMs from a FineTuneJob YAML, locally or on Kubernetes.")
err = Console(stderr=True, soft_wrap=True)  # never break paths or messages

JobFile = Annotated[Path, typer.Argument(help="A FineTuneJob YAML file.")]
PvcRoot = Annotated[
    Path | None,
    typer.Option(help="Local directory standing in for pvc:// claims: pvc://CLAIM/x is "
                 "PVC_ROOT/CLAIM/x. Default: ./pvc next to the job file."),
]


GpuMemory = Annotated[
    str | None,
    typer.Option(help="Memory of one GPU, e.g. 80Gi (a bare number: GiB); default: the job's "
                 "resources.gpuMemory. A job whose estimate does not fit is refused, with the "
                 "cheapest fixes."),
]


def _gpu_memory(text: str | None) -> float | None:
    """Bytes per GPU from --gpu-memory (80Gi, 80G, or 80 meaning GiB)."""
    from kubetune.estimate import GIB, parse_quantity

    if text is None:
        return None
    try:
        return float(text) * GIB
    except ValueError:
        pass
    try:
        return parse_quantity(text)
    except ValueError as e:
        raise KubetuneError(f"--gpu-memory: {e}") from None


def _fail(e: KubetuneError) -> None:
    from kubetune.urls import redact_text

    err.print(f"[bold red]error[/]: {escape(redact_text(str(e)))}", highlight=False,
              soft_wrap=True)
    raise typer.Exit(e.exit_code)


def log_dir() -> Path:
    """Where tracebacks of unexpected errors go: $KUBETUNE_CACHE/kubetune/logs (or
    $XDG_CACHE_HOME/kubetune/logs, ~/.cache/kubetune/logs)."""
    from kubetune_trainer.config import default_cache_dir

    return default_cache_dir() / "logs"


def _unexpected(e: Exception) -> None:
    """A bug or an environment problem no check foresaw: one line, the traceback in a file."""
    import time
    import traceback

    from kubetune.urls import redact_text

    text = redact_text(" ".join(str(e).split()))
    line = f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
    err.print(f"[bold red]error[/]: {escape(line)}", highlight=False, soft_wrap=True)
    try:
        d = log_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"kubetune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"kubetune {' '.join(sys.argv[1:])}\n"
                        + "".join(traceback.format_exception(e)))
        err.print(f"  the full traceback is in {path}", markup=False, highlight=False)
    except OSError as log_error:
        err.print(f"  (the traceback could not be written: {log_error})", markup=False,
                  highlight=False)
    raise typer.Exit(1)


def _context(job_file: Path, pvc_root: Path | None):
    from kubetune_trainer.config import RunContext

    base = job_file.resolve().parent
    return RunContext(base_dir=base, pvc_root=(pvc_root or base / "pvc").resolve())


def _offline_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def run(job_file: JobFile, pvc_root: PvcRoot = None,
        nproc: Annotated[int, typer.Option(
            min=1, max=64, help="Training processes here (gloo on CPU): the job's "
            "resources.strategy shards over them, as on the GPUs of one node.")] = 1,
        ) -> None:
    """Run a FineTuneJob here, without a cluster (resumes from its last checkpoint)."""
    from kubetune.jobfile import load_job

    _offline_defaults()
    try:
        job = load_job(job_file)
        if nproc > 1 or job.spec.resources.strategy != "ddp":
            result = _launch(job, job_file, pvc_root, nproc)
        else:
            from kubetune_trainer.train import run as train

            result = train(job, _context(job_file, pvc_root),
                           log=lambda m: err.print(m, highlight=False, markup=False))
    except KubetuneError as e:
        _fail(e)
        return
    err.print(f"[bold green]done[/] in {result.get('seconds', '?')}s, step "
              f"{result['global_step']}, train loss "
              f"{result['metrics'].get('train_loss', float('nan')):.4f}")
    for key in ("adapter", "merged_model", "model", "loss_plot", "progress"):
        if result.get(key):
            err.print(f"  {key:<13} {result[key]}", highlight=False)
    if result["checkpoints"]:
        err.print(f"  {'checkpoints':<13} {', '.join(result['checkpoints'])}", highlight=False)


@app.command()
def sweep(sweep_file: Annotated[Path, typer.Argument(help="A FineTuneSweep YAML file.")],
          pvc_root: PvcRoot = None,
          plan: Annotated[bool, typer.Option(
              "--plan", help="Only check every trial's spec and list the trials (their "
              "values and outputs); train nothing.")] = False) -> None:
    """Run a FineTuneSweep here: every trial's spec checked first, then each trial as
    `kubetune run` would (one after another, the median stopping rule as they log), a table
    of the results with the best marked, and sweep.json under the template's output."""
    from kubetune.sweep import load_sweep
    from kubetune.sweep_local import best, plan_table, run_sweep, table, write_summary

    _offline_defaults()
    spec = load_sweep(sweep_file)
    if plan:
        Console(soft_wrap=True).print(plan_table(spec))
        return
    ctx = _context(sweep_file, pvc_root)
    results = run_sweep(spec, ctx, log=lambda m: err.print(m, highlight=False, markup=False))
    Console(soft_wrap=True).print(table(spec, results))
    err.print(f"results: {write_summary(spec, results, ctx)}", highlight=False, markup=False)
    winner = best(results, spec.spec.objective.direction)
    if winner is None:
        raise KubetuneError("no trial succeeded with a value of "
                            f"{spec.spec.objective.metric}", field="spec.objective")
    where = (Path(winner.result["progress"]).parent.resolve() if winner.result.get("progress")
             else "?")
    err.print(f"best: {winner.name} ({spec.spec.objective.metric} {winner.value:.4f}); its "
              f"outputs are in {where}", highlight=False, markup=False)


def _launch(job: Any, job_file: Path, pvc_root: Path | None, nproc: int) -> dict[str, Any]:
    """Run through the trainer image's launcher (torchrun, or accelerate with DeepSpeed/FSDP)
    with ``nproc`` local processes; returns the run's result.json."""
    import json
    import socket
    import subprocess

    from kubetune_trainer.config import default_cache_dir
    from kubetune_trainer.outputs import output_root

    from kubetune.strategy import launcher_args

    ctx = _context(job_file, pvc_root)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PET_NNODES": "1", "PET_NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    # DeepSpeed compiles its C++ ops on first use (~1 min each): once, into the cache.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(default_cache_dir() / "torch_extensions"))
    cmd = [sys.executable, "-m", "kubetune_trainer.launch", str(job_file.resolve()),
           "--pvc-root", str(ctx.pvc_root), *launcher_args(job.spec), "--nproc", str(nproc)]
    result_file = output_root(job.spec, ctx) / "result.json"
    before = result_file.stat().st_mtime if result_file.exists() else None
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise KubetuneError(f"the training processes failed (exit code {code}); their "
                            "output is above")
    if not result_file.exists() or result_file.stat().st_mtime == before:
        raise KubetuneError(f"the run ended without writing {result_file}")
    return json.loads(result_file.read_text())


@app.command()
def validate(job_file: JobFile, pvc_root: PvcRoot = None,
             data: Annotated[bool, typer.Option(help="Also read and check the data.")] = True,
             gpu_memory: GpuMemory = None,
             ) -> None:
    """Check a FineTuneJob file: schema and rules, then (by default) its data, without
    training; and whether it fits its GPUs' memory."""
    from kubetune.jobfile import load_job

    _offline_defaults()
    try:
        job = load_job(job_file)
        limit = _gpu_memory(gpu_memory)
        err.print(f"{job_file}: schema and rules OK")
        if data:
            from kubetune_trainer.validate import preflight_all

            for line in preflight_all(job, _context(job_file, pvc_root), limit):
                err.print(line, highlight=False, markup=False)
        elif (job.spec.model.source or "").startswith(("hf://", "http://", "https://",
                                                        "s3://", "gs://")):
            # --no-data never touches the network: the model's config is not fetched.
            err.print("memory: not estimated (--no-data reads nothing from the network; "
                      "without it the model's config is fetched)", highlight=False,
                      markup=False)
        else:
            from kubetune_trainer.train import model_path
            from kubetune_trainer.validate import memory_check

            path = model_path(job.spec, _context(job_file, pvc_root), light=True)
            err.print(memory_check(path / "config.json", job.spec, limit), highlight=False,
                      markup=False)
    except KubetuneError as e:
        _fail(e)


@app.command()
def ask(
    model: Annotated[str | None, typer.Argument(
        help="A model directory or embedded://NAME (with --endpoint: the question).")] = None,
    question: Annotated[str | None, typer.Argument(help="What to ask.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, max=32768, help="Tokens generated at most (evaluation.maxNewTokens' bounds).")] = 60,
    endpoint: Annotated[str | None, typer.Option(
        help="An OpenAI-compatible server's URL (e.g. status.serving.url) instead of a "
        "local model.")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="With --endpoint: the model to ask for (default: the first it lists).")] = None,
) -> None:
    """Ask a model one question (greedy decoding) and print its answer."""
    if endpoint:
        from kubetune_operator.serving import EndpointError, chat

        question = question or model
        if not question:
            _fail(KubetuneError("give the question: kubetune ask --endpoint URL QUESTION"))
            return
        try:
            print(chat(endpoint, model_name, question, max_tokens=max_new_tokens))
        except EndpointError as e:
            _fail(KubetuneError(str(e), field="--endpoint"))
        return
    if not model or not question:
        _fail(KubetuneError("give a model and a question (or --endpoint URL and a question)"))
        return
    from kubetune_trainer.chat import answer

    _offline_defaults()
    try:
        print(answer(model, question, max_new_tokens=max_new_tokens))
    except KubetuneError as e:
        _fail(e)


@app.command()
def render(
    job_file: JobFile,
    image: Annotated[str | None, typer.Option(help="Trainer image (default: the operator's).")
                     ] = None,
    progress_url: Annotated[str | None, typer.Option(help="The operator's progress endpoint.")
                            ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    backend: Annotated[str, typer.Option(
        help="The operator's backend: PyTorchJob, TrainJob (Kubeflow Trainer v2) or Job "
        "(batch/v1, rendered for a current Kubernetes).")
    ] = "PyTorchJob",
    gpu_memory: GpuMemory = None,
    preflight: Annotated[str, typer.Option(
        help="The operator's default for a job whose spec.preflight is unset (the chart's "
        "preflight.default): auto, always or skip.")] = "auto",
) -> None:
    """Print the exact objects the operator would create for a job (for review, GitOps diffs);
    none when it would refuse the job (an invalid spec, or more memory than its GPUs have)."""
    import yaml
    from kubetune_operator.backends import backend_named, children
    from kubetune_operator.settings import OperatorConfig
    from kubetune_operator.validation import cluster_problem

    from kubetune.jobfile import load_job

    try:
        job = load_job(job_file)
        if namespace:
            job.metadata.namespace = namespace
        try:
            chosen = backend_named(backend)
        except ValueError as bad:
            raise KubetuneError(str(bad), field="--backend") from None
        problem = cluster_problem(job, chosen)
        if problem:  # the operator would create nothing and say this in a condition
            raise KubetuneError(problem)
        if preflight not in ("auto", "always", "skip"):
            raise KubetuneError(f"{preflight!r}: expected auto, always or skip",
                                field="--preflight")
        config = OperatorConfig(backend=chosen.kind, preflight=preflight, **{k: v for k, v in {
            "trainer_image": image, "progress_url": progress_url,
            "gpu_memory": (("default", f"{_gpu_memory(gpu_memory) or 0:.0f}"),)
            if gpu_memory else None}.items() if v})
        from kubetune_operator.admission import memory_verdict

        verdict = memory_verdict(job, config)  # as the operator checks it: hf:// config.json
        if verdict is None:
            err.print(f"memory: not estimated ({_not_estimated(job)})", highlight=False,
                      markup=False)
        elif verdict.fits is False:  # the operator would refuse it: no children
            raise KubetuneError(verdict.message(), field="spec.resources")
        else:
            err.print(f"memory: {verdict.message()}", highlight=False, markup=False)
    except KubetuneError as e:
        _fail(e)
        return
    objs = children(job=job, config=config, uid=None, labels=job.metadata.labels)
    if job.spec.model.from_job:
        err.print(f"note: the model comes from FineTuneJob {job.spec.model.from_job!r}: the "
                  "operator creates these once it has succeeded, with its model as "
                  "spec.model.source in the ConfigMap", highlight=False, markup=False)
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False))


def _not_estimated(job: Any) -> str:
    """Why ``render`` (the operator) has no memory estimate for a job."""
    from kubetune_operator.admission import model_config_problem

    model = job.spec.model
    if model.from_job:
        return (f"the model comes from FineTuneJob {model.from_job!r} and is known once that "
                "job has succeeded; `kubetune estimate --config CONFIG_JSON` checks it")
    if not (model.source or "").startswith("hf://"):
        return ("the operator reads the config.json of an hf:// model only; `kubetune "
                "estimate` reads this one")
    problem = model_config_problem(model.source, model.revision)
    if problem:
        return f"the model's config.json was not read: {problem}"
    return "the model's config.json does not give its shape (hidden size, layers, vocabulary)"


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="FineTuneJob name (with --sweep: FineTuneSweep).")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="NAME is a FineTuneSweep: its trials, their values and the best.")
    ] = False,
) -> None:
    """Show a FineTuneJob's phase, conditions, progress and checkpoints from the cluster (or
    a FineTuneSweep's trials)."""
    from kubetune.status_view import fetch, show, show_sweep

    try:
        body = fetch(name, namespace, "FineTuneSweep" if sweep else "FineTuneJob")
    except KubetuneError as e:
        _fail(e)
        return
    (show_sweep if sweep else show)(body, Console())


@app.command()
def crds(out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
         kind: Annotated[str, typer.Option(help="FineTuneJob or FineTuneSweep.")] = "FineTuneJob",
         ) -> None:
    """Print a CRD (FineTuneJob by default) generated from the API models."""
    from kubetune.api.crd import CRDS, render_yaml

    if kind not in CRDS:
        raise KubetuneError(f"--kind: no CRD {kind!r}; one of {', '.join(CRDS)}")
    text = render_yaml(kind)
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def estimate(
    job_file: JobFile,
    gpu_memory: GpuMemory = None,
    config: Annotated[Path | None, typer.Option(
        help="The model's config.json (default: the job's model: local, on a claim under "
        "--pvc-root, embedded, or from the Hub: its config and tokenizer files only).")
    ] = None,
    pvc_root: PvcRoot = None,
) -> None:
    """Per-GPU memory of a job (weights, gradients, optimizer state, activations) for its
    method, precision, strategy and GPU count, from the model's config.json alone."""
    import json

    from kubetune.estimate import fits, gpu_memory_for
    from kubetune.jobfile import load_job

    job = load_job(job_file)
    limit = _gpu_memory(gpu_memory)
    if config is None:
        source = job.spec.model.source or ""
        if job.spec.model.from_job or source.startswith(("s3://", "gs://", "http")):
            _fail(KubetuneError("the model's config.json is not here (a remote model or "
                                "another job's result): pass it with --config",
                                field="spec.model"))
        from kubetune_trainer.train import model_path

        config = model_path(job.spec, _context(job_file, pvc_root), light=True) / "config.json"
    try:
        verdict = fits(json.loads(config.read_text()), job.spec,
                       limit if limit is not None else gpu_memory_for(job.spec))
    except (OSError, ValueError) as e:
        _fail(KubetuneError(f"{config}: {e}"))
        return
    for line in verdict.estimate.lines():
        print(line)
    if verdict.fits is False:
        _fail(KubetuneError(verdict.message(), field="spec.resources"))
    elif verdict.fits is None:
        err.print("the GPU's memory is unknown: pass --gpu-memory or set "
                  "resources.gpuMemory to check it", highlight=False, markup=False)


@app.command("import")
def import_config(
    tool: Annotated[str, typer.Argument(help="The config's tool: llamafactory, axolotl or trl.")],
    config: Annotated[Path, typer.Argument(help="Its training config (YAML).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the FineTuneJob here (default: stdout).")] = None,
    stage: Annotated[str | None, typer.Option(
        help="trl: the trainer the config is for, as in `trl sft|dpo|kto|reward` (or orpo); "
        "default sft.")] = None,
    name: Annotated[str | None, typer.Option(
        help="metadata.name (default: from the config's file name).")
    ] = None,
    base_dir: Annotated[Path | None, typer.Option(
        help="The folder the tool runs in: its relative paths (data, dataset_dir, DeepSpeed "
        "configs) resolve here. Default: the current folder.")] = None,
    check: Annotated[bool, typer.Option(
        help="Also resolve the config with the tool's own loader, where the tool is "
        "installed, and compare the hyper-parameters.")] = False,
    check_python: Annotated[Path | None, typer.Option(
        help="With --check: the Python of an environment where the tool is installed (each "
        "tool pins its own transformers); default: kubetune's own.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Turn a LLaMA-Factory, Axolotl or TRL training config into a FineTuneJob. Every key is
    mapped or listed with why it has no equivalent (at the top of the file and here); the
    tool's defaults that differ from kubetune's are written out; local paths are listed with
    what must move to a claim or bucket."""
    from kubetune.importing import Context, convert, read_config

    if stage is not None and tool != "trl":
        raise KubetuneError(f"--stage is for trl configs (a {tool} config names its stage)")
    if out is not None and out.exists() and not force:
        raise KubetuneError(f"{out} already exists; use --force to overwrite")
    ctx = Context(config_path=config, base_dir=(base_dir or Path.cwd()).absolute(),
                  out_dir=(out.parent if out else Path.cwd()).absolute(), name=name,
                  stage=stage)
    imported = convert(tool, read_config(config), ctx)
    for line in imported.report():
        err.print(line, highlight=False, markup=False)
    if check or check_python:
        from kubetune.importing.check import compare

        for line in compare(tool, config, imported, ctx, check_python):
            err.print(line, highlight=False, markup=False)
    if out is None:
        sys.stdout.write(imported.text())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(imported.text())
        err.print(f"wrote {out}; next: `kubetune validate {out}`", highlight=False,
                  markup=False)


STARTERS = Path(__file__).resolve().parent / "starters"
STARTER_HELP = {
    "local": "LoRA on the bundled small model, here (writes data.json too)",
    "cluster-lora": "LoRA on a cluster: Hub model, data and outputs on volume claims",
    "qlora": "QLoRA on one GPU (4-bit base, merged to full precision)",
    "dpo": "DPO on preference pairs, after sft",
    "grpo": "GRPO with rewards declared in the spec",
}


@app.command()
def init(
    kind: Annotated[str, typer.Argument(help="One of: " + ", ".join(
        f"{k} ({v})" for k, v in STARTER_HELP.items()))] = "local",
    out: Annotated[Path, typer.Option(help="Where to write the job.")] = Path("finetune.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Write a commented starter FineTuneJob to edit (nobody starts from a blank file)."""
    if kind not in STARTER_HELP:
        _fail(KubetuneError(f"no starter {kind!r}; choose one of: "
                            + ", ".join(STARTER_HELP)))
    files = {out: STARTERS / f"{kind}.yaml"}
    if kind == "local":
        files[out.parent / "data.json"] = STARTERS / "data.json"
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        _fail(KubetuneError(f"{', '.join(existing)} already exist(s); use --force to "
                            "overwrite"))
    for target, source in files.items():  # what was done goes to stdout, errors to stderr
        target.write_text(source.read_text())
        print(f"wrote {target}")
    first = f"kubetune run {out}" if kind == "local" else f"kubetune render {out}"
    print(f"next: edit {out}, then `kubetune validate {out}` and `{first}`")


if __name__ == "__main__":
    app()
