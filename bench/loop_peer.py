"""The second peer for bench/operator_scale.py: a hand-written asyncio loop, no framework.

It watches FineTuneJobs in every namespace and, for each new one, makes what kubetune makes on
a create — the ConfigMap and the PyTorchJob (the bodies `kubetune render` printed for the bench
job, renamed per job) — and patches the status once. No validation, no finalizer, no retries
beyond the watch's own resume: the floor a hand-written controller on aiohttp reaches.

    python bench/loop_peer.py --template children.yaml --liveness 18001
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import ssl
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

FTJ = "/apis/kubetune.io/v1alpha1"
PTJ = "/apis/kubeflow.org/v1"


def _connection() -> tuple[str, dict[str, str], ssl.SSLContext | bool]:
    conf = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
    server = conf["clusters"][0]["cluster"]["server"].rstrip("/")
    token = conf["users"][0]["user"].get("token")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return server, headers, False  # the bench's throwaway servers: no certificate check


class Loop:
    def __init__(self, template: list[dict]) -> None:
        self.config_map = next(d for d in template if d["kind"] == "ConfigMap")
        self.child = next(d for d in template if d["kind"] == "PyTorchJob")
        self.url, headers, self.ssl = _connection()
        self.http = aiohttp.ClientSession(headers=headers,
                                          connector=aiohttp.TCPConnector(limit=64))
        self.seen: set[tuple[str, str]] = set()

    async def _post(self, path: str, body: dict) -> None:
        async with self.http.post(self.url + path, json=body, ssl=self.ssl) as resp:
            if resp.status >= 300 and resp.status != 409:
                print("create failed:", resp.status, await resp.text(), flush=True)

    async def handle(self, job: dict) -> None:
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        owner = [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": name,
                  "uid": meta.get("uid", ""), "controller": True, "blockOwnerDeletion": True}]
        config_map = copy.deepcopy(self.config_map)
        config_map["metadata"].update(name=f"{name}-config", namespace=ns,
                                      ownerReferences=owner)
        child = copy.deepcopy(self.child)
        child["metadata"].update(name=name, namespace=ns, ownerReferences=owner)
        for replica in child["spec"]["pytorchReplicaSpecs"].values():
            for volume in replica["template"]["spec"].get("volumes", []):
                if "configMap" in volume:
                    volume["configMap"]["name"] = f"{name}-config"
        await self._post(f"/api/v1/namespaces/{ns}/configmaps", config_map)
        await self._post(f"{PTJ}/namespaces/{ns}/pytorchjobs", child)
        patch = {"status": {"phase": "Pending", "observedGeneration": meta.get("generation"),
                            "conditions": [{"type": "Ready", "status": "False",
                                            "reason": "Created"}]}}
        async with self.http.patch(
                f"{self.url}{FTJ}/namespaces/{ns}/finetunejobs/{name}/status", json=patch,
                headers={"Content-Type": "application/merge-patch+json"},
                ssl=self.ssl) as resp:
            await resp.read()

    def _spawn(self, job: dict) -> None:
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        if key in self.seen or (job.get("status") or {}).get("phase"):
            return
        self.seen.add(key)
        asyncio.get_running_loop().create_task(self.handle(job))

    async def run(self) -> None:
        while True:
            try:
                async with self.http.get(f"{self.url}{FTJ}/finetunejobs", ssl=self.ssl) as r:
                    listing = await r.json()
                for job in listing.get("items", []):
                    self._spawn(job)
                version = listing.get("metadata", {}).get("resourceVersion")
                query = "?watch=1" + (f"&resourceVersion={version}" if version else "")
                async with self.http.get(f"{self.url}{FTJ}/finetunejobs{query}", ssl=self.ssl,
                                         timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    async for line in resp.content:
                        event = json.loads(line)
                        if event.get("type") == "ADDED":
                            self._spawn(event["object"])
            except (aiohttp.ClientError, ValueError) as err:
                print("watch restarts:", err, flush=True)
                await asyncio.sleep(0.5)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--template", required=True, help="kubetune render's output for one job")
    p.add_argument("--liveness", type=int, required=True, help="port for GET /healthz")
    args = p.parse_args()
    loop = Loop(list(yaml.safe_load_all(Path(args.template).read_text())))
    app = web.Application()
    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.liveness).start()
    await loop.run()


if __name__ == "__main__":
    asyncio.run(main())
