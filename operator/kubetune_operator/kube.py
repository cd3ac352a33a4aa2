"""The operator's one Kubernetes client: every request to the API server goes through ``Kube``.

Sync calls (kopf runs converges in threads) and async calls (the progress path: hundreds of
patches a second at a thousand jobs) share one URL builder (``path``), one set of credentials
and the API's own JSON (no client models). Errors: ``ApiException`` on the sync path as the
kubernetes client raises it, ``ApiError`` on the async path; both carry ``status``.
Also here: owner checks and the clock, the two things every converge asks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from typing import Any

from kubetune.api.v1alpha1 import API_VERSION, KIND

from kubetune_operator.apiserver import ApiServer

log = logging.getLogger("kubetune.kube")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plural(kind: str) -> str:
    """The resource name of a kind: every kind the operator touches follows the API's
    lower-case-plus-s rule (ConfigMap → configmaps, InferenceService → inferenceservices)."""
    return kind.lower() + "s"


def path(api_version: str, kind: str, ns: str, name: str | None = None,
         sub: str | None = None) -> str:
    """The URL path of a namespaced object (or collection, without ``name``)."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    out = f"{base}/namespaces/{ns}/{plural(kind)}"
    if name:
        out += f"/{name}" + (f"/{sub}" if sub else "")
    return out


def ref(api_version: str, kind: str, ns: str, name: str) -> dict[str, Any]:
    """An object's identity, the shape ``Kube.get`` takes."""
    return {"apiVersion": api_version, "kind": kind, "metadata": {"namespace": ns, "name": name}}


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    """Whether ``obj`` has an owner reference to ``uid`` (anything, when no uid is known)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return uid is None or any(r.get("uid") == uid for r in refs)


def api_client() -> Any:
    """The kubernetes client's ApiClient: in a pod its service account, elsewhere the current
    kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    conf = client.Configuration.get_default_copy()
    # One pooled connection per thread that may call at once (kopf's workers and asyncio's
    # executor): with fewer, urllib3 drops connections and every new one costs a TLS
    # handshake that loads the CA store (measured: 40 % of the operator's CPU at 200 jobs).
    conf.connection_pool_maxsize = max(conf.connection_pool_maxsize or 0, 64)
    return client.ApiClient(conf)


class ApiError(Exception):
    """An API server's refusal on the asyncio path (``status`` as ApiException has it; 0 when
    the server could not be reached)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


MERGE = "application/merge-patch+json"


class Kube:
    """The only place that talks to the API server."""

    AUTH_SECONDS = 10.0  # how long the client's auth headers are reused on the asyncio path

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Raw requests through the ApiClient (its pool, TLS, credentials): the typed APIs
        # build a validator for each of their hundreds of methods on first use (24 MiB of
        # the operator's memory for the few calls made here).
        self._api = api_client
        self._exc = client.exceptions.ApiException
        self._conf = api_client.configuration
        self._agent = api_client.user_agent  # the same on both paths (audit logs, tests)
        self._session: Any = None  # aiohttp, for the progress hot path
        self._auth: tuple[float, dict[str, str]] = (-1e9, {})

    # ------------------------------------------------------------------ sync

    def missing(self, err: Exception) -> bool:
        return isinstance(err, self._exc) and err.status == 404

    def request(self, method: str, url: str, body: Any = None,
                query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> Any:
        """One request through the synchronous client, the answer as the API's own JSON;
        ApiException as the typed calls raise it."""
        api = self._api
        method, url, headers, body, _ = api.param_serialize(
            method, url, query_params=query, body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": content_type})
        resp = api.call_api(method, url, header_params=headers, body=body)
        resp.read()  # to the end: the connection goes back to the pool
        if not 200 <= resp.status <= 299:
            raise self._exc.from_response(http_resp=resp, body=resp.data.decode(errors="replace"),
                                          data=None)
        return json.loads(resp.data) if resp.data else None

    def _or_none(self, method: str, url: str, **kw: Any) -> Any:
        try:
            return self.request(method, url, **kw)
        except self._exc as err:
            if self.missing(err):
                return None
            raise

    def server(self) -> ApiServer:
        """What the API server can do, from ``GET /version`` (every authenticated client may
        read it). Read once, at startup."""
        return ApiServer.from_version(self.request("GET", "/version") or {})

    def served_resources(self, api_version: str) -> frozenset[str] | None:
        """The resources (plurals) the API server serves in ``api_version`` (discovery,
        readable by every authenticated client); None when it answers 404: no such
        group/version here (its CRD is not installed)."""
        url = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        answer = self._or_none("GET", url)
        if answer is None:
            return None
        return frozenset(r["name"] for r in answer.get("resources") or []
                         if "/" not in r.get("name", "/"))

    def get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The object as it is now (``obj``: at least apiVersion, kind, namespace, name)."""
        meta = obj["metadata"]
        return self._or_none("GET", path(obj["apiVersion"], obj["kind"], meta["namespace"],
                                         meta["name"]))

    def list(self, api_version: str, kind: str, ns: str, *, labels: str | None = None,
             fields: str | None = None) -> list[dict[str, Any]]:
        query = [(k, v) for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v]
        return (self.request("GET", path(api_version, kind, ns), query=query) or {}).get(
            "items") or []

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create, or return what is already there (never a second one): (object, made)."""
        try:
            made = self.request("POST", path(obj["apiVersion"], obj["kind"],
                                             obj["metadata"]["namespace"]), obj)
            return made or obj, True  # (an emulator answering 200 instead of 201 gives None)
        except self._exc as err:
            if err.status == 409:
                existing = self.get(obj)
                if existing is not None:
                    return existing, False
            raise

    def delete(self, api_version: str, kind: str, ns: str, name: str, *,
               propagation: str | None = None) -> bool:
        """False if it was not there (or its kind is not served here). ``propagation``:
        Background or Foreground (a batch/v1 Job's own default orphans its pods)."""
        body = {"propagationPolicy": propagation} if propagation else None
        try:
            self.request("DELETE", path(api_version, kind, ns, name), body=body)
        except self._exc as err:
            if self.missing(err):
                return False
            raise
        return True

    def patch(self, api_version: str, kind: str, ns: str, name: str, patch: dict[str, Any],
              *, sub: str | None = None) -> dict[str, Any]:
        """A merge patch; with ``metadata.resourceVersion`` in it, only if the object has not
        changed since (409 otherwise)."""
        return self.request("PATCH", path(api_version, kind, ns, name, sub), patch,
                            content_type=MERGE) or {}

    def get_finetunejob(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.get(ref(API_VERSION, KIND, ns, name))

    def patch_status(self, ns: str, name: str, status: dict[str, Any],
                     resource_version: str | None = None) -> None:
        """Merge-patch a FineTuneJob's status; with ``resource_version`` only if the job has
        not changed since it was read (409 otherwise)."""
        self.patch(API_VERSION, KIND, ns, name, _status_body(status, resource_version),
                   sub="status")

    # ------------------------------------------------------------------ async

    async def patch_status_async(self, ns: str, name: str, status: dict[str, Any],
                                 resource_version: str | None = None) -> None:
        """``patch_status`` on the event loop: the progress flusher's hot path (one thread per
        request, as the synchronous client needs, does not keep up at a thousand jobs)."""
        await self.request_async("PATCH", path(API_VERSION, KIND, ns, name, "status"),
                                 _status_body(status, resource_version), content_type=MERGE,
                                 answer=False)

    async def get_async(self, api_version: str, kind: str, ns: str, name: str
                        ) -> dict[str, Any] | None:
        try:
            return await self.request_async("GET", path(api_version, kind, ns, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def get_finetunejob_async(self, ns: str, name: str) -> dict[str, Any] | None:
        return await self.get_async(API_VERSION, KIND, ns, name)

    async def create_async(self, obj: dict[str, Any]) -> bool:
        """``create`` on the event loop: True when made, False when one of that name is
        already there (409: nothing is read back here)."""
        try:
            await self.request_async("POST", path(obj["apiVersion"], obj["kind"],
                                                  obj["metadata"]["namespace"]), obj,
                                     answer=False)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    async def token_review_async(self, token: str, audience: str) -> dict[str, Any]:
        """A TokenReview (a thousand pods' first reports at once). Its name is ignored by the
        API server; a unique one keeps emulators that store every create (kmock) from
        refusing the second review."""
        return await self.request_async("POST", "/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"name": f"kubetune-{uuid.uuid4().hex[:16]}"},
            "spec": {"token": token, "audiences": [audience]}}) or {}

    async def request_async(self, method: str, url: str, body: Any = None, *,
                            content_type: str = "application/json", answer: bool = True
                            ) -> Any:
        """One API call on the event loop, with the synchronous client's credentials."""
        import aiohttp

        session = await self._async_session()
        headers = {"Content-Type": content_type, "Accept": "application/json",
                   "User-Agent": self._agent}
        headers.update(self._auth_headers())
        try:
            async with session.request(method, self._conf.host + url, json=body,
                                       headers=headers) as resp:
                if resp.status >= 300:
                    raise ApiError(resp.status, (await resp.text())[:500])
                if not answer:  # read to the end all the same: the connection is reused
                    await resp.read()
                    return None
                return await resp.json(content_type=None)
        except aiohttp.ClientError as err:
            raise ApiError(0, str(err)) from err

    def _auth_headers(self) -> dict[str, str]:
        """The client's own auth settings (a bearer token, refreshed when it rotates). Asked
        again every few seconds, not per request: with a kubeconfig, the client reloads it on
        every ask."""
        at, headers = self._auth
        if time.monotonic() - at > self.AUTH_SECONDS:
            headers = {auth["key"]: auth["value"]
                       for auth in self._conf.auth_settings().values()
                       if auth.get("in") == "header" and auth.get("value")}
            self._auth = (time.monotonic(), headers)
        return headers

    async def _async_session(self) -> Any:
        import asyncio
        import ssl

        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is not None and self._session[0] is loop:
            return self._session[1]
        conf = self._conf
        tls: Any = False  # plain http (test servers); https below
        if conf.host.startswith("https"):
            tls = ssl.create_default_context(cafile=conf.ssl_ca_cert)
            if conf.cert_file:
                tls.load_cert_chain(conf.cert_file, conf.key_file)
            if not conf.verify_ssl:
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, ssl=tls),
                                        timeout=aiohttp.ClientTimeout(total=30))
        self._session = (loop, session)
        return session

    async def close_async(self) -> None:
        if self._session is not None:
            await self._session[1].close()
            self._session = None


def _status_body(status: dict[str, Any], resource_version: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return body
