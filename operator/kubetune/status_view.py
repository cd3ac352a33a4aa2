"""`kubetune status`: read a FineTuneJob (or a FineTuneSweep) from the cluster and show it to a
person."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kubetune.errors import KubetuneError


def fetch(name: str, namespace: str | None, kind: str = "FineTuneJob") -> dict[str, Any]:
    import urllib3
    import yaml
    from kubernetes import client, config

    from kubetune.api.v1alpha1 import GROUP, PLURAL, SWEEP_PLURAL, VERSION

    plural = SWEEP_PLURAL if kind == "FineTuneSweep" else PLURAL

    kubeconfig = os.environ.get("KUBECONFIG") or None  # read now, not at import
    try:
        config.load_kube_config(config_file=kubeconfig)
        _, ctx = config.list_kube_config_contexts(config_file=kubeconfig)
        ns = namespace or ctx.get("context", {}).get("namespace") or "default"
    except yaml.YAMLError as bad:
        raise KubetuneError(_no_config(kubeconfig, bad)) from None
    except config.ConfigException as outside:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise KubetuneError(_no_config(kubeconfig, outside)) from None
        ns = namespace or "default"
    api = client.CustomObjectsApi()
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
    except client.exceptions.ApiException as err:
        if err.status == 404:
            raise KubetuneError(f"no {kind} {name!r} in namespace {ns!r}") from None
        raise KubetuneError(f"the API server said {err.status}: {err.reason}") from None
    except urllib3.exceptions.HTTPError as err:
        host = client.Configuration.get_default_copy().host
        reason = getattr(err, "reason", None) or err
        raise KubetuneError(f"cannot reach the API server at {host}: {reason}") from None


def _no_config(kubeconfig: str | None, problem: Exception) -> str:
    """One line naming where a configuration was looked for."""
    problem_text = " ".join(str(problem).split())
    if kubeconfig:
        return f"cannot use KUBECONFIG={kubeconfig}: {problem_text}"
    default = os.path.expanduser("~/.kube/config")
    if os.path.exists(default):
        return f"cannot use {default}: {problem_text}"
    return (f"no Kubernetes configuration: KUBECONFIG is not set and {default} does not exist "
            "(and not running in a cluster)")


def show(body: dict[str, Any], console: Console) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    gen, seen = meta.get("generation"), status.get("observedGeneration")
    stale = " (status not yet updated for the latest spec)" if gen and seen != gen else ""
    console.print(f"[bold]{meta['namespace']}/{meta['name']}[/]  phase: "
                  f"[bold]{status.get('phase', 'Unknown')}[/]{stale}")
    p = status.get("progress") or {}
    if p:
        console.print(
            f"step {p.get('step', '?')}/{p.get('totalSteps', '?')} ({p.get('percent', '?')}%)  "
            f"loss {p.get('loss', '?')}  lr {p.get('learningRate', '?')}  "
            f"tokens/s {p.get('tokensPerSecond', '?')}  eta {p.get('eta', '?')}")
        if p.get("metrics"):
            console.print("  ".join(f"{escape(k)} {v:.4g}" for k, v in p["metrics"].items()
                                    if isinstance(v, int | float)), highlight=False)
    console.print(_conditions(status))
    if status.get("failure"):
        f = status["failure"]
        console.print(f"[red]failure[/]: {escape(str(f.get('reason')))} (exit "
                      f"{f.get('exitCode')}, pod {f.get('pod')}): "
                      f"{escape(f.get('message', ''))}")
        if f.get("logTail"):
            console.print(f["logTail"], markup=False, highlight=False)
    for cp in status.get("checkpoints") or []:
        console.print(f"checkpoint step {cp['step']}  loss {cp.get('loss')}  {cp['uri']}")
    for key, value in (status.get("outputs") or {}).items():
        if key == "metrics" and isinstance(value, dict):
            console.print("final metrics: " + "  ".join(
                f"{escape(k)} {v:.4g}" for k, v in value.items() if isinstance(v, int | float)),
                highlight=False)
        else:
            console.print(f"{key}: {escape(str(value))}", highlight=False)


def _conditions(status: dict[str, Any]) -> Table:
    table = Table("condition", "status", "reason", "message", box=None)
    for c in status.get("conditions") or []:
        table.add_row(c["type"], c["status"], escape(c.get("reason") or ""),
                      escape(c.get("message") or ""))
    return table


def show_sweep(body: dict[str, Any], console: Console) -> None:
    """A FineTuneSweep: trials done, its conditions, a row per trial, the best."""
    meta, status = body["metadata"], body.get("status") or {}
    spec = body.get("spec") or {}
    objective = spec.get("objective") or {}
    gen, seen = meta.get("generation"), status.get("observedGeneration")
    stale = " (status not yet updated for the latest spec)" if gen and seen != gen else ""
    console.print(f"[bold]{meta['namespace']}/{meta['name']}[/]  trials ended: "
                  f"[bold]{status.get('done', '?')}[/]  "
                  f"{escape(str(objective.get('direction', 'minimize')))} "
                  f"{escape(str(objective.get('metric', '?')))}{stale}")
    console.print(_conditions(status))
    paths = [p.get("path") for p in spec.get("parameters") or []]
    best = (status.get("best") or {}).get("name")
    trials = Table("trial", *paths, "phase", "value", box=None)
    for t in status.get("trials") or []:
        phase = t.get("phase") or "?"
        if t.get("stoppedEarly"):
            phase = "stopped early"
        value = t.get("value")
        trials.add_row(("* " if t["name"] == best else "  ") + escape(t["name"]),
                       *(escape((t.get("parameters") or {}).get(p, "")) for p in paths),
                       phase, f"{value:.4g}" if isinstance(value, int | float) else "-")
    console.print(trials)
    if best:
        b = status["best"]
        console.print(f"best: {escape(best)} ({escape(str(objective.get('metric')))} "
                      f"{b.get('value')})", highlight=False)
