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
import json
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
CONFORMANCE = Path(os.environ.get("KUBETUNE_CONFORMANCE", REPO.parent / "shared" / "conformance"))
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


def _job(i: int, emulated: bool) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"] = {"name": f"job-{i:05d}", "namespace": NS}
    if emulated:  # kmock sets none of these itself
        doc["metadata"].update(resourceVersion="1", generation=1, uid=f"uid-{i}")
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


class Emulator:
    """kmock in this process; progress tokens are accepted by a TokenReview handler."""

    name = "kmock emulator"

    async def __aenter__(self):
        self.emulator = kmock.KubernetesEmulator()
        self._server = kmock.Server(self.emulator)
        await self.emulator.__aenter__()
        server = await self._server.__aenter__()
        self.emulator.resources.load_bundled()
        for res, kind in ((FTJ, "FineTuneJob"), (PTJ, "PyTorchJob")):
            self.emulator.resources[res] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=True, subresources={"status"},
                verbs={"get", "list", "watch", "create", "patch", "delete"})
        for key in [k for k in self.emulator.resources if "tokenreviews" in str(k)]:
            del self.emulator.resources[key]

        def review(req):
            user = {"username": f"system:serviceaccount:{NS}:default",
                    "extra": {"authentication.kubernetes.io/pod-name":
                              [req.data["spec"]["token"]]}}
            return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": req.data["spec"],
                    "status": {"authenticated": True, "audiences": ["kubetune"], "user": user}}

        self.emulator["post /apis/authentication.k8s.io/v1/tokenreviews"] << review
        self.url = str(server.url).rstrip("/")
        self.headers: dict[str, str] = {}
        self.ssl = None
        self._tmp = tempfile.TemporaryDirectory()
        self.kubeconfig = _kubeconfig(self.url, Path(self._tmp.name) / "kc")
        return self

    async def __aexit__(self, *exc):
        await self._server.__aexit__(*exc)
        await self.emulator.__aexit__(*exc)
        self._tmp.cleanup()

    def created(self) -> set[str]:
        return {key[2] for key in list(self.emulator.objects) if key[0] == PTJ}

    async def status(self, http, name: str) -> dict:
        return self.emulator.objects[FTJ, NS, name].get("status") or {}

    async def progress_token(self, http, name: str) -> str:
        return f"{name}-master-0"


class ControlPlane:
    """A fresh etcd + kube-apiserver + controller-manager (tests/e2e/local_cluster.py) per run:
    real TokenReviews from pod-bound tokens, real watch streams."""

    name = "local kube-apiserver (etcd, controller-manager; tests/e2e/local_cluster.py)"

    async def __aenter__(self):
        sys.path.insert(0, str(REPO / "tests" / "e2e"))
        from local_cluster import cluster

        self._cm = cluster()
        self.kubeconfig = await asyncio.to_thread(self._cm.__enter__)
        try:
            await self._setup()
        except BaseException:
            await asyncio.to_thread(self._cm.__exit__, None, None, None)
            raise
        self._session = aiohttp.ClientSession(headers=self.headers)
        self._watch = asyncio.create_task(self._watch_children())
        return self

    async def _setup(self) -> None:
        conf = yaml.safe_load(self.kubeconfig.read_text())
        self.url = conf["clusters"][0]["cluster"]["server"]
        self.headers = {"Authorization": f"Bearer {conf['users'][0]['user']['token']}"}
        self.ssl = False  # a throwaway local API server with a self-signed certificate
        self._created: set[str] = set()
        async with aiohttp.ClientSession(headers=self.headers) as http:
            for path in (REPO / "crds" / "kubetune.io_finetunejobs.yaml",
                         CONFORMANCE / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"):
                await self._ok(http.post(f"{self.url}/apis/apiextensions.k8s.io/v1/"
                                         "customresourcedefinitions",
                                         json=yaml.safe_load(path.read_text()), ssl=False))
            await self._ok(http.post(f"{self.url}/api/v1/namespaces",
                                     json={"metadata": {"name": NS}}, ssl=False))
            for _ in range(240):  # CRDs established, the namespace's default ServiceAccount
                async with http.get(f"{self.url}/apis/kubeflow.org/v1/namespaces/{NS}/"
                                    "pytorchjobs", ssl=False) as a, \
                        http.get(f"{self.url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/"
                                 "finetunejobs", ssl=False) as b, \
                        http.get(f"{self.url}/api/v1/namespaces/{NS}/serviceaccounts/default",
                                 ssl=False) as c:
                    if a.status == b.status == c.status == 200:
                        return
                await asyncio.sleep(0.5)
        raise RuntimeError("the CRDs or the namespace's ServiceAccount never became ready")

    @staticmethod
    async def _ok(request) -> None:
        async with request as resp:
            if resp.status >= 300:
                raise RuntimeError(f"{resp.status}: {await resp.text()}")

    async def _watch_children(self) -> None:
        url = (f"{self.url}/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
               "?watch=1&allowWatchBookmarks=false")
        while True:
            try:
                async with self._session.get(url, ssl=False, timeout=aiohttp.ClientTimeout(
                        total=None, sock_read=None)) as resp:
                    async for line in resp.content:
                        event = json.loads(line)
                        if event.get("type") == "ADDED":
                            self._created.add(event["object"]["metadata"]["name"])
            except (aiohttp.ClientError, ValueError):
                await asyncio.sleep(0.2)

    async def __aexit__(self, *exc):
        self._watch.cancel()
        await self._session.close()
        await asyncio.to_thread(self._cm.__exit__, None, None, None)

    def created(self) -> set[str]:
        return set(self._created)

    async def status(self, http, name: str) -> dict:
        async with http.get(f"{self.url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/"
                            f"finetunejobs/{name}", ssl=False) as resp:
            return (await resp.json()).get("status") or {}

    async def progress_token(self, http, name: str) -> str:
        """A pod owned by the job's PyTorchJob, and a token bound to it (as the kubelet
        mounts it): the operator's TokenReview and ownership check pass for real."""
        async with http.get(f"{self.url}/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/"
                            f"{name}", ssl=False) as resp:
            child = await resp.json()
        pod = {"metadata": {"name": f"{name}-master-0", "ownerReferences": [{
            "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": name,
            "uid": child["metadata"]["uid"], "controller": True}]},
            "spec": {"automountServiceAccountToken": False,
                     "containers": [{"name": "pytorch", "image": "trainer"}]}}
        async with http.post(f"{self.url}/api/v1/namespaces/{NS}/pods", json=pod,
                             ssl=False) as resp:
            pod = await resp.json()
        request = {"spec": {"audiences": ["kubetune"], "expirationSeconds": 3600,
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                               "name": pod["metadata"]["name"],
                                               "uid": pod["metadata"]["uid"]}}}
        async with http.post(f"{self.url}/api/v1/namespaces/{NS}/serviceaccounts/default/"
                             "token", json=request, ssl=False) as resp:
            return (await resp.json())["status"]["token"]


async def run_one(which: str, n: int, progress_samples: int, backend_cls) -> dict:
    async with backend_cls() as backend:
        port = 18000 + (os.getpid() % 1000)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "KUBECONFIG": str(backend.kubeconfig),
                   "KUBETUNE_PROGRESS_PORT": str(port), "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
                   "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1",
                   "KUBETUNE_PROGRESS_FLUSH_SECONDS": "1", "KUBETUNE_RECHECK_SECONDS": "600",
                   "PYTHONWARNINGS": "ignore"}
            module = "kubetune_operator.handlers" if which == "kubetune" else "bench_peer"
            live = port + 1
            cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "-A", "--quiet",
                   f"--liveness=http://127.0.0.1:{live}/healthz", "-m", module]
            log = open(Path(tmp) / "operator.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(REPO / "bench")},
                                    stdout=subprocess.DEVNULL, stderr=log)
            try:
                applied: dict[str, float] = {}
                async with aiohttp.ClientSession(headers=backend.headers) as http:
                    await _wait_live(http, f"http://127.0.0.1:{live}/healthz")
                    path = f"{backend.url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
                    for i in range(n):
                        body = _job(i, backend_cls is Emulator)
                        applied[body["metadata"]["name"]] = time.monotonic()
                        async with http.post(path, json=body, ssl=backend.ssl) as resp:
                            if resp.status >= 300:
                                raise RuntimeError(f"apply: {resp.status} {await resp.text()}")
                    created: dict[str, float] = {}
                    deadline = time.monotonic() + 60 + n * 0.2
                    while len(created) < n and time.monotonic() < deadline:
                        now = time.monotonic()
                        for name in backend.created() - created.keys():
                            created[name] = now
                        await asyncio.sleep(0.01)
                    latencies = [created[k] - applied[k] for k in created if k in applied]
                    lags: list[float] = []
                    if which == "kubetune":
                        for i in range(min(progress_samples, n)):
                            name = f"job-{i:05d}"
                            token = await backend.progress_token(http, name)
                            step = 1000 + i
                            t0 = time.monotonic()
                            async with http.post(
                                    f"http://127.0.0.1:{port}/v1/namespaces/{NS}/finetunejobs/"
                                    f"{name}/status",
                                    headers={"Authorization": f"Bearer {token}"},
                                    json={"trainerStatus": {"metrics": [
                                        {"name": "current_step", "value": str(step)}]}}) as r:
                                if r.status != 200:
                                    raise RuntimeError(f"progress report refused: {r.status}")
                            while time.monotonic() - t0 < 30:
                                status = await backend.status(http, name)
                                if status.get("progress", {}).get("step") == step:
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
    p.add_argument("--cluster", action="store_true",
                   help="a fresh local control plane per run instead of kmock (needs "
                        "tests/e2e/build_kube.sh's binaries)")
    args = p.parse_args()
    backend = ControlPlane if args.cluster else Emulator
    print(f"operator benchmark on {backend.name}; {os.cpu_count()} cores shared with it")
    print(f"{'operator':9} {'jobs':>5} {'created':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'lag p50 s':>10} {'lag max s':>10} {'RSS MiB':>8}")
    for n in args.jobs:
        rows = {}
        for which in ("kubetune", "peer"):
            r = asyncio.run(run_one(which, n, args.progress_samples, backend))
            rows[which] = r
            print(f"{which:9} {n:5d} {r['created']:8d} {r['p50']:7.2f} {r['p99']:7.2f} "
                  f"{r['lag_p50']:10.2f} {r['lag_max']:10.2f} {r['rss']:8.0f}", flush=True)
        k, b = rows["kubetune"], rows["peer"]
        print(f"  ratio kubetune/peer at {n}: p50 {k['p50'] / b['p50']:.2f}x, "
              f"p99 {k['p99'] / b['p99']:.2f}x, RSS {k['rss'] / b['rss']:.2f}x")


if __name__ == "__main__":
    main()
