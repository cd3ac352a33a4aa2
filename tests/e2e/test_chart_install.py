"""The Helm chart on a real API server, and the operator running with only the chart's RBAC.

The chart is rendered by the real helm and applied with kubectl; the operator then runs here as
the Deployment would run it (its command, arguments and environment, ports moved to free local
ones) but logged in with a token of the chart's ServiceAccount, so the API server's RBAC
authorizer decides every call. A job goes through create → Running → progress → Succeeded
with events; nothing may be forbidden on the way.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest
import yaml
from tools import helm, kubectl

from e2e.util import REPO, free_port, job_pod, pod_token, wait

pytestmark = pytest.mark.e2e


def _kubeconfig_for(kube, token: str, path) -> str:
    conf = kube.Configuration.get_default_copy()
    cluster = {"server": conf.host}
    if conf.ssl_ca_cert:
        cluster["certificate-authority"] = conf.ssl_ca_cert
    elif not conf.verify_ssl:
        cluster["insecure-skip-tls-verify"] = True
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    return str(path)


@pytest.fixture(scope="module")
def release(kube, crds, namespace, server_minor, tmp_path_factory):
    """The chart installed (release namespace of its own, watching ``namespace``)."""
    tmp = tmp_path_factory.mktemp("chart")
    name, release_ns = "kt-" + uuid.uuid4().hex[:6], f"kubetune-sys-{uuid.uuid4().hex[:6]}"
    core = kube.CoreV1Api()
    core.create_namespace({"metadata": {"name": release_ns}})
    # The chart declares kubeVersion >= 1.30 (CEL in the CRD); on an older test server render
    # it for 1.30 and let the server take what it understands.
    version = f"1.{max(server_minor, 30)}.0"
    rendered = subprocess.run(
        [str(helm()), "template", name, str(REPO / "charts" / "kubetune"), "-n", release_ns,
         "--include-crds", "--kube-version", version, "--set", f"watchNamespaces={{{namespace}}}",
         "--set", "progress.enabled=true"],
        check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    env = {**os.environ}
    # Before 1.25 the server's schema does not know x-kubernetes-validations (CEL): kubectl's
    # client-side check would refuse the CRD, the server itself drops the rules.
    check = [] if server_minor >= 25 else ["--validate=false"]
    # As helm does: CRDs first, established, then the objects (KopfPeerings need their CRD).
    crd_docs = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    for part, objs in (("crds", crd_docs),
                       ("chart", [d for d in docs if d["kind"] != "CustomResourceDefinition"])):
        path = tmp / f"{part}.yaml"
        path.write_text(yaml.safe_dump_all(objs))
        applied = subprocess.run([str(kubectl()), "apply", *check, "-f", str(path)], env=env,
                                 capture_output=True, text=True)
        assert applied.returncode == 0, applied.stderr
        if part == "crds":
            subprocess.run([str(kubectl()), "wait", "--for=condition=established",
                            "--timeout=60s", *[f"crd/{d['metadata']['name']}" for d in objs]],
                           env=env, check=True, capture_output=True)
    yield {"name": name, "namespace": release_ns, "docs": docs, "tmp": tmp}
    # Uninstall as helm would with crds.keep: the CRDs (and every job) stay.
    subprocess.run([str(kubectl()), "delete", "--wait=false", "--ignore-not-found", "-f",
                    str(tmp / "chart.yaml")], env=env, capture_output=True)
    core.delete_namespace(release_ns)


@pytest.fixture(scope="module")
def chart_operator(kube, release, namespace):
    """The Deployment's container, run here with the chart's ServiceAccount token."""
    deployment = next(d for d in release["docs"] if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sa = pod["serviceAccountName"]
    token = kube.CoreV1Api().create_namespaced_service_account_token(
        sa, release["namespace"], {"spec": {"expirationSeconds": 3600}}).status.token
    kubeconfig = _kubeconfig_for(kube, token, release["tmp"] / "sa-kubeconfig")

    ports = {"health": free_port(), "metrics": free_port(), "progress": free_port()}
    env = {e["name"]: str(e.get("value", "")) for e in container.get("env", []) if "value" in e}
    # HTTPS, as the chart has it (the operator's own CA, its Secret made with only the chart's
    # RBAC); the URL names the loopback address the test reaches it on, so its certificate does.
    assert env["KUBETUNE_PROGRESS_URL"].startswith("https://")
    env.update(KUBETUNE_METRICS_PORT=str(ports["metrics"]),
               KUBETUNE_PROGRESS_PORT=str(ports["progress"]),
               KUBETUNE_PROGRESS_URL=f"https://127.0.0.1:{ports['progress']}/v1",
               KUBETUNE_PROGRESS_HOST="127.0.0.1", KUBETUNE_PROGRESS_FLUSH_SECONDS="0.5")
    args = [a.replace("0.0.0.0:8080", f"127.0.0.1:{ports['health']}") for a in container["args"]]
    assert container["command"] == ["kopf"]
    log = release["tmp"] / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kopf", *args],
                                env={**os.environ, **env, "KUBECONFIG": kubeconfig},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        secret = wait(lambda: _read_secret(kube, release["namespace"],
                                           env["KUBETUNE_PROGRESS_CERT_SECRET"]), timeout=60)
        cafile = release["tmp"] / "progress-ca.crt"
        cafile.write_bytes(base64.b64decode(secret.data["ca.crt"]))
        wait(lambda: _post_tls(f"https://127.0.0.1:{ports['progress']}/healthz", "", {},
                               cafile) == 405, timeout=60)  # answers (GET-only route)
        yield {"ports": ports, "log": log, "proc": proc, "cafile": cafile}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_operator_works_with_only_the_charts_rbac(kube, namespace, chart_operator):
    custom, core = kube.CustomObjectsApi(), kube.CoreV1Api()
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    # A GPU job gets its pre-flight Job (the chart's default, auto) with only the chart's
    # RBAC; the rest of this test follows one that goes straight to its PyTorchJob.
    doc["metadata"] = {"name": "rbac-pf", "namespace": namespace}
    custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                           doc)
    pf = wait(lambda: kube.BatchV1Api().read_namespaced_job("rbac-pf-preflight", namespace))
    assert pf.spec.template.spec.containers[0].command == ["kubetune-preflight"]
    custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                           "rbac-pf")
    doc["metadata"] = {"name": "rbac", "namespace": namespace}
    doc["spec"]["preflight"] = "skip"
    custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                           doc)

    def get(plural="finetunejobs", group="kubetune.io", version="v1alpha1"):
        return custom.get_namespaced_custom_object(group, version, namespace, plural, "rbac")

    child = wait(lambda: get("pytorchjobs", "kubeflow.org", "v1"))
    core.read_namespaced_config_map("rbac-config", namespace)
    custom.patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", namespace, "pytorchjobs", "rbac",
        {"status": {"conditions": [{"type": t, "status": "True", "reason": t, "message": t}
                                   for t in ("Created", "Running")]}})
    wait(lambda: (get().get("status") or {}).get("phase") == "Running")

    wait(lambda: core.read_namespaced_service_account("default", namespace))
    master = job_pod(core, namespace, "rbac-master-0", owner=child)
    # The CA the pods mount, in the job's namespace before its child; checked against, it lets
    # the report in; without it the endpoint is refused.
    cafile = chart_operator["cafile"]
    published = core.read_namespaced_config_map("kubetune-progress-ca", namespace)
    assert published.data["ca.crt"].encode() == cafile.read_bytes()
    url = (f"https://127.0.0.1:{chart_operator['ports']['progress']}/v1/namespaces/{namespace}"
           "/finetunejobs/rbac/status")
    token = pod_token(core, namespace, master)
    with pytest.raises(ssl.SSLError):
        _post_tls(url, token, {}, None)
    assert _post_tls(url, token, {"trainerStatus": {
        "progressPercentage": 10, "metrics": [{"name": "current_step", "value": "10"}]}},
        cafile) == 200
    wait(lambda: get()["status"].get("progress", {}).get("step") == 10, timeout=30)

    custom.patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", namespace, "pytorchjobs", "rbac",
        {"status": {"conditions": [{"type": t, "status": "True", "reason": t, "message": t}
                                   for t in ("Created", "Succeeded")]}})
    wait(lambda: get()["status"].get("phase") == "Succeeded")
    events = core.list_namespaced_event(namespace,
                                        field_selector="involvedObject.name=rbac").items
    assert {"Created", "Succeeded"} <= {e.reason for e in events}

    output = chart_operator["log"].read_text()
    assert chart_operator["proc"].poll() is None, output[-3000:]
    for sign in ("Forbidden", "forbidden", " 403", "Traceback"):
        assert sign not in output, output[-5000:]


def _read_secret(kube, namespace: str, name: str):
    from kubernetes.client.exceptions import ApiException

    try:
        return kube.CoreV1Api().read_namespaced_secret(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _post_tls(url: str, token: str, body: dict, cafile) -> int:
    """POST over HTTPS, checking the endpoint against ``cafile`` (None: the system's CAs;
    ssl.SSLError when it does not check out); the HTTP status."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            raise err.reason from None
        raise
