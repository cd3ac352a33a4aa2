"""Operator at scale: FineTuneJobs applied to an API server, kubetune against two peers.

    make bench-operator-cluster   # a real kube-apiserver per run, 1,000 jobs
    python bench/operator_scale.py [--cluster] [--jobs 100 1000] [--peers kubetune loop]

Three operators, each in its own process against a fresh API server (kmock, or with --cluster
a local etcd + kube-apiserver + controller-manager): kubetune; `kopf`, a bare kopf operator that
creates one small PyTorchJob per FineTuneJob (bench/bench_peer.py, the framework's floor); and
`loop`, a hand-written asyncio loop that makes the same objects kubetune makes (ConfigMap,
PyTorchJob, one status patch; bench/loop_peer.py). Printed per operator:
- burst: N jobs applied back to back → PyTorchJob created, p50/p99 from the server's view;
- steady: then one job at a time at --rate per second, p99;
- peak RSS with all jobs live;
- kubetune only: every job reports progress every --report-every seconds (as pods do, with
  pod-bound tokens on a real server) → the step seen in the status, p50/p99; on a real
  server, then the server's ceiling: status patches/s of those jobs with the operator stopped
  (the lag can only be small while the jobs need fewer patches than that);
- API requests by verb and resource (real server only; the driver's own calls taken out):
  per job for the burst and steady phases, per second while jobs report progress;
- the operator's CPU time per job in the burst;
- ratios of kubetune to each peer.
The driver and the server share the machine's cores with the operator: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

        def review(req):  # a token here is "POD-NAME/POD-UID"
            pod, uid = req.data["spec"]["token"].split("/")
            user = {"username": f"system:serviceaccount:{NS}:default",
                    "extra": {"authentication.kubernetes.io/pod-name": [pod],
                              "authentication.kubernetes.io/pod-uid": [uid]}}
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
        """A pod owned by the job's PyTorchJob, as the PyTorchJob controller would make."""
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-master-0", "namespace": NS, "uid": f"pod-{name}",
            "resourceVersion": "1", "ownerReferences": [{
                "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": name,
                "uid": f"ptj-{name}", "controller": True}]}}
        async with http.post(f"{self.url}/api/v1/namespaces/{NS}/pods", json=pod) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"pod: {resp.status} {await resp.text()}")
        return f"{name}-master-0/pod-{name}"

    def progress_step(self, name: str) -> int:
        status = self.emulator.objects[FTJ, NS, name].get("status") or {}
        return (status.get("progress") or {}).get("step") or 0

    async def request_counts(self) -> dict[str, float] | None:
        return None  # the emulator keeps no request metrics


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
        self._steps: dict[str, int] = {}
        self.watch_restarts = 0
        self._watches = [asyncio.create_task(self._watch("kubeflow.org/v1", "pytorchjobs",
                                                         self._child_event)),
                         asyncio.create_task(self._watch("kubetune.io/v1alpha1",
                                                         "finetunejobs", self._job_event))]
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

    async def _watch(self, group_version: str, plural: str, handle) -> None:
        """Every event, none lost: a stream the server closes (it drops a watcher that reads
        too slowly) resumes from the last resourceVersion seen, as informers do; one too old
        to resume from (410) lists again."""
        base = f"{self.url}/apis/{group_version}/namespaces/{NS}/{plural}"
        version = None
        while True:
            try:
                if version is None:
                    async with self._session.get(base, ssl=False) as resp:
                        listing = await resp.json()
                    for item in listing["items"]:
                        handle({"type": "ADDED", "object": item})
                    version = listing["metadata"]["resourceVersion"]
                async with self._session.get(
                        f"{base}?watch=1&allowWatchBookmarks=true&resourceVersion={version}",
                        ssl=False, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)
                ) as resp:
                    async for line in resp.content:
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            version = None if event["object"].get("code") == 410 else version
                            break
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            handle(event)
            except (aiohttp.ClientError, ValueError, KeyError):
                await asyncio.sleep(0.2)
            self.watch_restarts += 1

    def _child_event(self, event: dict) -> None:
        if event.get("type") == "ADDED":
            self._created.add(event["object"]["metadata"]["name"])

    def _job_event(self, event: dict) -> None:
        obj = event.get("object") or {}
        step = ((obj.get("status") or {}).get("progress") or {}).get("step")
        if step is not None:
            self._steps[obj["metadata"]["name"]] = step

    def progress_step(self, name: str) -> int:
        return self._steps.get(name, 0)

    async def request_counts(self) -> dict[str, float]:
        """The API server's own request counters by verb, for what the operators touch."""
        totals: dict[str, float] = {}
        async with self._session.get(f"{self.url}/metrics", ssl=False) as resp:
            text = await resp.text()
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
            fields = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
            resource = fields.get("resource", "").strip('"')
            if resource in COUNTED:
                subresource = fields.get("subresource", "").strip('"')
                key = f"{fields.get('verb', '').strip(chr(34))} {resource}" + (
                    f"/{subresource}" if subresource else "")
                totals[key] = totals.get(key, 0) + float(value)
        return totals

    async def __aexit__(self, *exc):
        for task in self._watches:
            task.cancel()
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


PEERS = ("kubetune", "kopf", "loop")
# What the operators under test touch; the control plane's own controllers and the driver's
# pods and tokens are left out of the request counts (the driver's own calls are subtracted).
COUNTED = {"finetunejobs", "pytorchjobs", "configmaps", "events", "pods", "tokenreviews",
           "subjectaccessreviews"}


def _operator_cmd(which: str, live: int, template: Path) -> list[str]:
    if which == "loop":
        return [sys.executable, str(REPO / "bench" / "loop_peer.py"), "--template",
                str(template), "--liveness", str(live)]
    module = "kubetune_operator.handlers" if which == "kubetune" else "bench_peer"
    return [sys.executable, "-m", "kopf", "run", "--standalone", "-A", "--quiet",
            f"--liveness=http://127.0.0.1:{live}/healthz", "-m", module]


def _template(path: Path) -> Path:
    """The children kubetune makes for the bench job, for the hand-written loop to copy."""
    job = REPO / "examples" / "assistant-identity.yaml"
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "render", str(job),
                          "--preflight", "skip"],
                         check=True, capture_output=True, text=True).stdout
    path.write_text(out)
    return path


class Driver:
    """The bench's own API calls, counted by verb so that they can be taken out of the
    server's totals."""

    def __init__(self, http: aiohttp.ClientSession, backend) -> None:
        self.http, self.backend = http, backend
        self.calls: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    async def apply(self, i: int) -> str:
        body = _job(i, isinstance(self.backend, Emulator))
        path = f"{self.backend.url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
        self.count("POST finetunejobs")
        async with self.http.post(path, json=body, ssl=self.backend.ssl) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"apply: {resp.status} {await resp.text()}")
        return body["metadata"]["name"]


async def _created_times(backend, applied: dict[str, float], expected: int,
                         timeout: float) -> dict[str, float]:
    """Watch for the children of `applied` (filled while this runs) until `expected` exist."""
    created: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(created) < expected and time.monotonic() < deadline:
        now = time.monotonic()
        for name in backend.created() & applied.keys() - created.keys():
            created[name] = now - applied[name]
        await asyncio.sleep(0.005)
    return created


async def _burst(driver: Driver, n: int) -> tuple[list[float], float]:
    """The latencies, and how long applying the burst took."""
    applied: dict[str, float] = {}
    seen = asyncio.create_task(_created_times(driver.backend, applied, n, 60 + n * 0.2))
    t0 = time.monotonic()
    for i in range(n):
        applied[f"job-{i:05d}"] = time.monotonic()
        await driver.apply(i)
    took = time.monotonic() - t0
    return list((await seen).values()), took


async def _steady(driver: Driver, first: int, rate: float, seconds: float) -> list[float]:
    """Jobs applied one at a time at `rate` per second while the operator already holds the
    burst's jobs; each job's latency is measured alone."""
    applied: dict[str, float] = {}
    count = int(rate * seconds)
    seen = asyncio.create_task(_created_times(driver.backend, applied, count, seconds + 60))
    t0 = time.monotonic()
    for k in range(count):
        await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        applied[f"job-{first + k:05d}"] = time.monotonic()
        await driver.apply(first + k)
    return list((await seen).values())


async def _progress(driver: Driver, n: int, every: float, seconds: float, port: int,
                    cpu) -> tuple[list[float], float]:
    """Every job reports a step every `every` seconds (staggered) for `seconds`; the lag is
    report → the step seen in the FineTuneJob's status, for every report, with its step
    (a job's first report waits for its token review). Also the operator's CPU (`cpu()`: its
    seconds so far) while the jobs report, in cores."""
    backend, http = driver.backend, driver.http
    tokens = {}
    for i in range(n):
        name = f"job-{i:05d}"
        tokens[name] = await backend.progress_token(http, name)
        # (kube-apiserver 1.20 counts a GET of a custom resource as LIST: so does the driver)
        driver.count("LIST pytorchjobs"), driver.count("POST pods")
    lags: list[tuple[int, float]] = []
    sent: list[tuple[str, int, float]] = []

    # Every report comes from this one address: at most the endpoint's connections per peer
    # (reporting.server.MAX_CONNECTIONS_PER_PEER, 8; a real pod holds one), kept alive.
    reports = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))

    async def report(name: str, offset: float) -> None:
        await asyncio.sleep(offset)
        step = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            step += 1
            t = time.monotonic()
            async with reports.post(
                    f"http://127.0.0.1:{port}/v1/namespaces/{NS}/finetunejobs/{name}/status",
                    headers={"Authorization": f"Bearer {tokens[name]}"},
                    json={"trainerStatus": {"metrics": [
                        {"name": "current_step", "value": str(step)}]}}) as r:
                if r.status != 200:
                    raise RuntimeError(f"progress report refused: {r.status}")
            sent.append((name, step, t))
            await asyncio.sleep(max(0.0, t + every - time.monotonic()))

    async def observe() -> None:
        # Each job's reports on their own: one job behind must not hold up the others' lags.
        pending: dict[str, collections.deque[tuple[int, float]]] = {}
        taken = 0
        while True:
            for name, step, t in sent[taken:]:
                pending.setdefault(name, collections.deque()).append((step, t))
            taken = len(sent)
            now = time.monotonic()
            for name in [k for k, q in pending.items() if q]:
                have, queue = backend.progress_step(name), pending[name]
                while queue and have >= queue[0][0]:
                    step, t = queue.popleft()
                    lags.append((step, now - t))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(observe())
    cpu0, t0 = cpu(), time.monotonic()
    async with reports:
        await asyncio.gather(*(report(f"job-{i:05d}", every * i / n) for i in range(n)))
    cores = (cpu() - cpu0) / (time.monotonic() - t0)
    deadline = time.monotonic() + 30
    while len(lags) < len(sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    watcher.cancel()
    # Never seen: unbounded lag.
    return lags + [(0, float("inf"))] * (len(sent) - len(lags)), cores


def _rates(before: dict[str, float] | None, after: dict[str, float] | None,
           driver: dict[str, int], seconds: float) -> dict[str, float]:
    """Requests by verb and resource, less the driver's own, divided by ``seconds`` (or by
    any other count)."""
    if before is None or after is None:
        return {}
    return {verb: (after[verb] - before.get(verb, 0) - driver.get(verb, 0)) / seconds
            for verb in sorted(after) if after[verb] - before.get(verb, 0) > driver.get(verb, 0)}


async def run_one(which: str, n: int, args, backend_cls, template: Path) -> dict:
    async with backend_cls() as backend:
        port = 18000 + (os.getpid() % 1000)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "KUBECONFIG": str(backend.kubeconfig),
                   "KUBETUNE_PROGRESS_PORT": str(port), "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
                   "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1",
                   "KUBETUNE_PROGRESS_FLUSH_SECONDS": "1", "KUBETUNE_RECHECK_SECONDS": "600",
                   # Straight to the PyTorchJob, as the peers do (no pre-flight Job first).
                   "KUBETUNE_PREFLIGHT": "skip",
                   "PYTHONWARNINGS": "ignore",
                   "MALLOC_ARENA_MAX": "2",  # as operator/Dockerfile sets it (for every peer)
                   "PYTHONPATH": os.pathsep.join(filter(None, [
                       str(REPO / "bench"), os.environ.get("PYTHONPATH")]))}
            live = port + 1
            log = open(Path(tmp) / "operator.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(_operator_cmd(which, live, template), env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            result: dict = {"which": which, "n": n}
            profiler = None
            try:
                async with aiohttp.ClientSession(headers=backend.headers) as http:
                    driver = Driver(http, backend)
                    await _wait_live(http, f"http://127.0.0.1:{live}/healthz")
                    if args.profile:  # py-spy's collapsed stacks, for flamegraph tools
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profiler = subprocess.Popen(
                            ["py-spy", "record", "--format", "raw", "--nonblocking",
                             "--pid", str(proc.pid), "-o", str(args.profile / f"{which}-{n}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    before, t0 = await backend.request_counts(), time.monotonic()
                    cpu0 = _cpu_seconds(proc.pid)
                    burst, applying = await _burst(driver, n)
                    # The operator's CPU for the burst: wait until it is done with it.
                    await asyncio.sleep(1.0)
                    result.update(cpu_ms=(_cpu_seconds(proc.pid) - cpu0) * 1000 / n,
                                  apply_rate=n / applying)
                    steady = (await _steady(driver, n, args.rate, args.steady_seconds)
                              if args.steady_seconds else [])
                    # Per job created (burst and steady): requests are what each job costs.
                    result["writes"] = _rates(before, await backend.request_counts(),
                                              driver.calls, n + len(steady))
                    result.update(created=len(burst), p50=_pct(burst, 0.5),
                                  p99=_pct(burst, 0.99), steady_p99=_pct(steady, 0.99),
                                  steady_n=len(steady), rss=_rss_mib(proc.pid))
                    if which == "kubetune" and args.report_seconds:
                        driver.calls.clear()
                        before, t0 = await backend.request_counts(), time.monotonic()
                        lags, result["progress_cpu"] = await _progress(
                            driver, n, args.report_every, args.report_seconds, port,
                            lambda: _cpu_seconds(proc.pid))
                        took = time.monotonic() - t0
                        result["progress_writes"] = _rates(
                            before, await backend.request_counts(), driver.calls, took)
                        every_lag = [lag for _, lag in lags]
                        later = [lag for step, lag in lags if step != 1]
                        result.update(lag_p50=_pct(every_lag, 0.5), lag_p99=_pct(every_lag, 0.99),
                                      lag_max=max(every_lag, default=float("nan")),
                                      later_p50=_pct(later, 0.5), later_p99=_pct(later, 0.99),
                                      reports=sum(lag != float("inf") for lag in every_lag),
                                      sent=len(lags))
                    result["rss"] = _rss_mib(proc.pid)
                    result["watch_restarts"] = getattr(backend, "watch_restarts", 0)
            finally:
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait(30)
                log.close()
                if os.environ.get("KUBETUNE_BENCH_LOG"):
                    print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if "reports" in result and isinstance(backend, ControlPlane):
            result["ceiling"] = await _patch_ceiling(backend, n)
    return result


async def _patch_ceiling(backend: ControlPlane, n: int, seconds: float = 10.0,
                         concurrency: int = 32) -> float:
    """Status patches per second the API server takes for these jobs as they now are, the
    operator stopped: a loop keeping `concurrency` progress patches in flight. What the
    lag can be read against (n jobs reporting every r seconds need n / r patches/s)."""
    done = 0
    end = time.monotonic() + seconds
    headers = {**backend.headers, "Content-Type": "application/merge-patch+json"}

    async def worker(http: aiohttp.ClientSession, first: int) -> None:
        nonlocal done
        i = first
        while time.monotonic() < end:
            async with http.patch(
                    f"{backend.url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/"
                    f"job-{i % n:05d}/status", ssl=False, headers=headers,
                    json={"status": {"progress": {"step": 10_000 + done}}}) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"patch: {resp.status} {await resp.text()}")
            done += 1
            i += concurrency

    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http, k) for k in range(concurrency)))
    return done / (time.monotonic() - t0)


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, nargs="+", default=[20, 100],
                   help="burst sizes (kmock slows down super-linearly: 1000 takes very long)")
    p.add_argument("--rate", type=float, default=10.0, help="steady-state jobs per second")
    p.add_argument("--steady-seconds", type=float, default=10.0,
                   help="how long to apply jobs at --rate after the burst (0: no steady phase)")
    p.add_argument("--report-every", type=float, default=5.0,
                   help="seconds between one job's progress reports")
    p.add_argument("--report-seconds", type=float, default=20.0,
                   help="how long every job reports progress (0: no progress phase)")
    p.add_argument("--profile", type=Path, help="a directory for py-spy profiles of each "
                   "operator (needs py-spy on PATH)")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--cluster", action="store_true",
                   help="a fresh local control plane per run instead of kmock (needs "
                        "tests/e2e/build_kube.sh's binaries)")
    args = p.parse_args()
    backend = ControlPlane if args.cluster else Emulator
    print(f"operator benchmark on {backend.name}; {os.cpu_count()} cores shared with it")
    print("burst: apply → PyTorchJob created; steady: one job at a time at "
          f"{args.rate:g}/s for {args.steady_seconds:g} s after the burst; lag: progress "
          f"report → status, every job reporting every {args.report_every:g} s")
    print(f"{'operator':9} {'jobs':>5} {'created':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'steady p99 s':>13} {'lag p50 s':>10} {'lag p99 s':>10} {'RSS MiB':>8} "
          f"{'CPU ms/job':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        template = _template(Path(tmp) / "children.yaml")
        for n in args.jobs:
            rows = {}
            for which in args.peers:
                r = asyncio.run(run_one(which, n, args, backend, template))
                rows[which] = r
                print(f"{which:9} {n:5d} {r['created']:8d} {_fmt(r['p50']):>7} "
                      f"{_fmt(r['p99']):>7} {_fmt(r['steady_p99']):>13} "
                      f"{_fmt(r.get('lag_p50')):>10} {_fmt(r.get('lag_p99')):>10} "
                      f"{r['rss']:8.0f} {_fmt(r.get('cpu_ms')):>11}", flush=True)
                print(f"  {which}: burst applied at {r['apply_rate']:.0f} jobs/s"
                      + (f"; progress reports seen {r['reports']}/{r['sent']}, lag max "
                         f"{_fmt(r['lag_max'])} s; after each job's first report (its token "
                         f"review) p50 {_fmt(r['later_p50'])} s, p99 {_fmt(r['later_p99'])} s; "
                         "operator CPU while reporting "
                         f"{r['progress_cpu']:.0%} of a core" if "reports" in r else "")
                      + (f"; the server dropped the driver's watch {r['watch_restarts']}x "
                         "(resumed, no event lost)" if r.get("watch_restarts") else ""))
                if r.get("ceiling"):
                    print(f"  API server ceiling, the operator stopped: {r['ceiling']:.0f} status "
                          f"patches/s of these jobs ({n} jobs reporting every "
                          f"{args.report_every:g} s need {n / args.report_every:.0f}/s)")
                for key, what in (("writes", "API requests per job (burst + steady)"),
                                  ("progress_writes", "API requests/s (progress)")):
                    if r.get(key):
                        print(f"  {which} {what}: "
                              + ", ".join(f"{v} {x:.2f}" for v, x in r[key].items()))
            k = rows.get("kubetune")
            for peer in ("kopf", "loop"):
                b = rows.get(peer)
                if k and b:
                    print(f"  ratio kubetune/{peer} at {n}: p50 {k['p50'] / b['p50']:.2f}x, "
                          f"p99 {k['p99'] / b['p99']:.2f}x, RSS {k['rss'] / b['rss']:.2f}x, "
                          f"CPU/job {k['cpu_ms'] / b['cpu_ms']:.2f}x")
    if args.cluster:
        print("(kube-apiserver 1.20 counts a GET of one custom resource as LIST: 'LIST "
              "finetunejobs' are reads of single jobs; the watches are WATCH)")


if __name__ == "__main__":
    main()
