"""Operator at scale: N FineTuneJobs applied to the kmock API emulator.

    make bench-operator     # or: python bench/operator_scale.py [--jobs 100 1000]

For each N it runs, against the same emulator, (1) the kubetune operator and (2) a peer: a bare
kopf operator that only creates one PyTorchJob per FineTuneJob (the framework's floor). Each
operator is its own process (`kopf run`, logging in through a kubeconfig that points at the
emulator), so its memory is its own. Printed per N: apply → PyTorchJob created latency
(p50/p99, from the emulator's view), progress report → status lag (kubetune only: the peer has
no progress path), operator peak RSS, and the ratios kubetune/peer.

The emulator shares the driver's process and the machine's 2 cores with the operator: the
figures are relative, not a promise about a real API server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import kmock
import yaml

REPO = Path(__file__).resolve().parents[1]
FTJ = "kubetune.io/v1alpha1/finetunejobs"
PTJ = "kubeflow.org/v1/pytorchjobs"
NS = "bench"


def _kubeconfig(url: str, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "bench"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}]}))
    return path


def _job(i: int) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"] = {"name": f"job-{i:05d}", "namespace": NS, "resourceVersion": "1",
                       "generation": 1, "uid": f"uid-{i}"}
    return doc


async def _wait_live(http: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    """Start timing only once the operator answers its liveness probe (imports done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    await asyncio.sleep(1.0)  # the initial (empty) listings
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the operator did not come up")


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_one(which: str, n: int, progress_samples: int) -> dict:
    emulator = kmock.KubernetesEmulator()
    async with emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        for res, kind in ((FTJ, "FineTuneJob"), (PTJ, "PyTorchJob")):
            emulator.resources[res] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=True, subresources={"status"},
                verbs={"get", "list", "watch", "create", "patch", "delete"})
        for key in [k for k in emulator.resources if "tokenreviews" in str(k)]:
            del emulator.resources[key]

        def review(req):
            user = {"username": f"system:serviceaccount:{NS}:default",
                    "extra": {"authentication.kubernetes.io/pod-name":
                              [req.data["spec"]["token"]]}}
            return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": req.data["spec"],
                    "status": {"authenticated": True, "audiences": ["kubetune"], "user": user}}

        emulator["post /apis/authentication.k8s.io/v1/tokenreviews"] << review
        url = str(server.url).rstrip("/")
        port = 18000 + (os.getpid() % 1000)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "KUBECONFIG": str(_kubeconfig(url, Path(tmp) / "kc")),
                   "KUBETUNE_PROGRESS_PORT": str(port), "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
                   "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1",
                   "KUBETUNE_PROGRESS_FLUSH_SECONDS": "1", "KUBETUNE_RECHECK_SECONDS": "600"}
            module = "kubetune_operator.handlers" if which == "kubetune" else "bench_peer"
            live = port + 1
            cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "-A", "--quiet",
                   f"--liveness=http://127.0.0.1:{live}/healthz", "-m", module]
            log = open(Path(tmp) / "operator.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(REPO / "bench")},
                                    stdout=subprocess.DEVNULL, stderr=log)
            try:
                applied: dict[str, float] = {}
                async with aiohttp.ClientSession() as http:
                    await _wait_live(http, f"http://127.0.0.1:{live}/healthz")
                    path = f"{url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
                    for i in range(n):
                        body = _job(i)
                        applied[body["metadata"]["name"]] = time.monotonic()
                        await http.post(path, json=body)
                    created: dict[str, float] = {}
                    deadline = time.monotonic() + 60 + n * 0.2
                    while len(created) < n and time.monotonic() < deadline:
                        now = time.monotonic()
                        for key in list(emulator.objects):
                            if key[0] == PTJ and key[2] not in created:
                                created[key[2]] = now
                        await asyncio.sleep(0.01)
                    latencies = [created[k] - applied[k] for k in created]
                    lags: list[float] = []
                    if which == "kubetune":
                        for i in range(min(progress_samples, n)):
                            name = f"job-{i:05d}"
                            step = 1000 + i
                            t0 = time.monotonic()
                            await http.post(
                                f"http://127.0.0.1:{port}/v1/namespaces/{NS}/finetunejobs/"
                                f"{name}/status",
                                headers={"Authorization": f"Bearer {name}-master-0"},
                                json={"trainerStatus": {"metrics": [
                                    {"name": "current_step", "value": str(step)}]}})
                            while time.monotonic() - t0 < 30:
                                obj = emulator.objects[FTJ, NS, name]
                                if (obj.get("status") or {}).get("progress", {}).get(
                                        "step") == step:
                                    lags.append(time.monotonic() - t0)
                                    break
                                await asyncio.sleep(0.01)
                rss = _rss_mib(proc.pid)
            finally:
                log.close()
                if os.environ.get("KUBETUNE_BENCH_LOG"):
                    print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {"which": which, "n": n, "created": len(latencies),
            "p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99),
            "lag_p50": _pct(lags, 0.5), "lag_max": max(lags) if lags else float("nan"),
            "rss": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, nargs="+", default=[20, 100],
                   help="job counts (kmock slows down super-linearly: 1000 takes very long)")
    p.add_argument("--progress-samples", type=int, default=20)
    args = p.parse_args()
    print("operator benchmark on the kmock emulator (2 cores shared with it)")
    print(f"{'operator':9} {'jobs':>5} {'created':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'lag p50 s':>10} {'lag max s':>10} {'RSS MiB':>8}")
    for n in args.jobs:
        rows = {}
        for which in ("kubetune", "peer"):
            r = asyncio.run(run_one(which, n, args.progress_samples))
            rows[which] = r
            print(f"{which:9} {n:5d} {r['created']:8d} {r['p50']:7.2f} {r['p99']:7.2f} "
                  f"{r['lag_p50']:10.2f} {r['lag_max']:10.2f} {r['rss']:8.0f}", flush=True)
        k, b = rows["kubetune"], rows["peer"]
        print(f"  ratio kubetune/peer at {n}: p50 {k['p50'] / b['p50']:.2f}x, "
              f"p99 {k['p99'] / b['p99']:.2f}x, RSS {k['rss'] / b['rss']:.2f}x")


if __name__ == "__main__":
    main()
