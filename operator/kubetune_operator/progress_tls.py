"""The progress endpoint's TLS, with nothing to set up: the operator's own CA and serving
certificate, and the CA handed to every training pod.

As controller-runtime's cert rotator (and so Kubeflow Trainer) does it: the CA and the serving
certificate live in one Secret in the operator's namespace (``ca.crt``, ``ca.key``, ``tls.crt``,
``tls.key``), created when missing and renewed before they expire. Replicas share it: the first
to create it wins (409: the others read it back), and a renewal is a patch conditional on the
version read (409: read again, use what the other replica wrote). Each replica re-reads it every
``CHECK_SECONDS`` and serves what it holds.

Pods check the endpoint against the CA in a ConfigMap (``PROGRESS_CA_CONFIGMAP``, key
``ca.crt``) that the operator keeps in each job's namespace, as Kubernetes keeps
``kube-root-ca.crt``: written before a job's first child, labelled as kubetune's, updated when
the CA changes (a renewed CA is published beside the previous one while that is still valid).

A Secret of the user's (cert-manager's) wins: its files are served, re-read on the same
schedule, and its ``ca.crt`` is what is published. Keys and certificates are never logged.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kubetune_operator.builders import MANAGED_BY, PROGRESS_CA_CONFIGMAP, PROGRESS_CA_KEY

log = logging.getLogger("kubetune.tls")

CA_LIFETIME = dt.timedelta(days=3650)
CERT_LIFETIME = dt.timedelta(days=365)
# Renewed when less than this is left: the CA a year ahead (pods holding the old one keep it
# beside the new one until it expires), the serving certificate a month ahead.
CA_RENEW_BEFORE = dt.timedelta(days=365)
CERT_RENEW_BEFORE = dt.timedelta(days=30)
CHECK_SECONDS = 3600.0  # how often each replica re-reads (and renews) the certificate
PUBLISHED_TTL = 300.0  # seconds a namespace's CA ConfigMap is trusted as written, unread
LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": "kubetune",
          "app.kubernetes.io/component": "progress-ca"}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ------------------------------------------------------------------------ certificates (pure)


@dataclass(frozen=True)
class Bundle:
    """A CA and the serving certificate it signed (PEM). ``previous_ca``: the CA a renewal
    replaced, published beside the new one while pods may still hold it."""

    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes
    previous_ca: bytes = b""

    KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key", "previous-ca.crt")

    def secret_data(self) -> dict[str, str]:
        values = (self.ca_crt, self.ca_key, self.tls_crt, self.tls_key, self.previous_ca)
        return {k: base64.b64encode(v).decode() for k, v in zip(self.KEYS, values, strict=True)}

    @classmethod
    def from_secret(cls, secret: dict[str, Any] | None) -> Bundle | None:
        """The bundle a Secret holds; None when it lacks a part or a part is not base64."""
        data = (secret or {}).get("data") or {}
        try:
            parts = [base64.b64decode(data.get(k) or "", validate=True) for k in cls.KEYS]
        except ValueError:
            return None
        if not all(parts[:4]):
            return None
        return cls(*parts)

    def published_ca(self, now: dt.datetime | None = None) -> bytes:
        """What pods trust: the CA, and the one it replaced while that is still valid."""
        out = self.ca_crt
        if self.previous_ca and _valid_until(self.previous_ca) > (now or utcnow()):
            out = out.rstrip(b"\n") + b"\n" + self.previous_ca
        return out


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubetune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def new_ca(now: dt.datetime) -> tuple[bytes, bytes]:
    """A self-signed CA (certificate, key), valid ``CA_LIFETIME`` from ``now``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = _key()
    name = _name("kubetune progress CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue(ca_crt: bytes, ca_key: bytes, hosts: list[str], now: dt.datetime
          ) -> tuple[bytes, bytes]:
    """A serving certificate for ``hosts`` (DNS names or IP addresses), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = x509.load_pem_x509_certificate(ca_crt)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    key = _key()
    sans: list[Any] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    not_after = min(now + CERT_LIFETIME, ca.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False,
                crl_sign=False, content_commitment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_bundle(hosts: list[str], now: dt.datetime, previous_ca: bytes = b"") -> Bundle:
    ca_crt, ca_key = new_ca(now)
    return Bundle(ca_crt, ca_key, *issue(ca_crt, ca_key, hosts, now), previous_ca=previous_ca)


def _valid_until(pem: bytes) -> dt.datetime:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def renewal_reason(bundle: Bundle | None, hosts: list[str], now: dt.datetime) -> str | None:
    """Why the bundle must be renewed (None: it is good). Never the certificates themselves."""
    from cryptography import x509

    if bundle is None:
        return "the Secret lacks a part"
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_crt)
        cert = x509.load_pem_x509_certificate(bundle.tls_crt)
        cert.verify_directly_issued_by(ca)
    except ValueError:
        return "its certificate is unreadable or not issued by its CA"
    except Exception as err:  # InvalidSignature, TypeError (another key type)
        return f"its certificate is not issued by its CA ({type(err).__name__})"
    if ca.not_valid_after_utc - now < CA_RENEW_BEFORE:
        return f"the CA expires on {ca.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_after_utc - now < CERT_RENEW_BEFORE:
        return f"the certificate expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the certificate names no hosts"
    have = {str(n) for n in names.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in names.get_values_for_type(x509.IPAddress)}
    if missing := [h for h in hosts if h not in have]:
        return f"the certificate does not name {', '.join(missing)}"
    return None


def renewed(bundle: Bundle | None, hosts: list[str], now: dt.datetime) -> Bundle:
    """A new serving certificate; a new CA too when the CA is due (or unusable), the old
    one kept as ``previous_ca``."""
    from cryptography import x509

    if bundle is not None:
        try:
            ca = x509.load_pem_x509_certificate(bundle.ca_crt)
            if ca.not_valid_after_utc - now >= CA_RENEW_BEFORE:
                return Bundle(bundle.ca_crt, bundle.ca_key,
                              *issue(bundle.ca_crt, bundle.ca_key, hosts, now),
                              previous_ca=bundle.previous_ca)
        except ValueError:
            return new_bundle(hosts, now)
        return new_bundle(hosts, now, previous_ca=bundle.ca_crt)
    return new_bundle(hosts, now)


def hosts_for(url: str | None) -> list[str]:
    """The names a pod reaches the endpoint by: the URL's host, and for a Service's
    ``NAME.NAMESPACE.svc`` its other cluster spellings."""
    host = (urlsplit(url).hostname if url else None) or "localhost"
    hosts = [host]
    parts = host.split(".")
    if len(parts) == 3 and parts[2] == "svc":
        hosts += [f"{host}.cluster.local", f"{parts[0]}.{parts[1]}", parts[0]]
    return hosts


def server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_into(context, cert, key)
    return context


def load_into(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Serve ``cert`` from now on (new handshakes; open connections keep theirs). The ssl
    module loads only from files: they live a moment in a private temporary folder."""
    with tempfile.TemporaryDirectory(prefix="kubetune-tls-") as folder:
        paths = []
        for name, pem in (("tls.crt", cert), ("tls.key", key)):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            paths.append(path)
        context.load_cert_chain(*paths)


def fingerprint(pem: bytes) -> str:
    """A short digest to log instead of a certificate."""
    return hashlib.sha256(pem).hexdigest()[:12]


# ------------------------------------------------------------------------ the Secret


class CertKeeper:
    """The operator's CA and serving certificate in ``namespace``/``name``: created when
    missing, renewed when due, shared by every replica. Blocking (the synchronous client):
    call it from a thread."""

    def __init__(self, kube: Any, namespace: str, name: str, hosts: list[str],
                 now: Callable[[], dt.datetime] = utcnow) -> None:
        self.kube, self.namespace, self.name, self.hosts = kube, namespace, name, hosts
        self.now = now

    def _ref(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Secret",
                "metadata": {"namespace": self.namespace, "name": self.name}}

    def ensure(self) -> Bundle:
        """The bundle to serve: the Secret's, renewed first when due."""
        secret = self.kube.get(self._ref())
        for _ in range(5):
            if secret is None:
                bundle = new_bundle(self.hosts, self.now())
                secret, made = self.kube.create({
                    **self._ref(), "type": "kubernetes.io/tls",
                    "metadata": {**self._ref()["metadata"], "labels": dict(LABELS)},
                    "data": bundle.secret_data()})
                if made:
                    log.info("progress endpoint: created its CA and certificate in Secret %s/%s "
                             "(certificate %s)", self.namespace, self.name,
                             fingerprint(bundle.tls_crt))
                    return bundle
                continue  # another replica made it first: use theirs (read back by create)
            bundle = Bundle.from_secret(secret)
            why = renewal_reason(bundle, self.hosts, self.now())
            if why is None:
                assert bundle is not None
                return bundle
            fresh = renewed(bundle, self.hosts, self.now())
            version = (secret.get("metadata") or {}).get("resourceVersion")
            try:
                self.kube.patch("v1", "Secret", self.namespace, self.name, {
                    "metadata": {"resourceVersion": version} if version else {},
                    "data": fresh.secret_data()})
            except Exception as err:
                if getattr(err, "status", None) != 409:
                    raise
                secret = self.kube.get(self._ref())  # another replica renewed it: theirs
                continue
            what = "certificate" if bundle and fresh.ca_crt == bundle.ca_crt else \
                "CA and certificate"
            log.info("progress endpoint: renewed its %s in Secret %s/%s (%s; certificate %s)",
                     what, self.namespace, self.name, why, fingerprint(fresh.tls_crt))
            return fresh
        raise RuntimeError(f"Secret {self.namespace}/{self.name} kept changing under us")


# ------------------------------------------------------------------------ the CA for pods


class CaPublisher:
    """The CA ConfigMap in each job namespace. ``ensure`` is cheap after the first call for a
    namespace (re-read every ``PUBLISHED_TTL`` s, so one deleted by hand comes back); a new
    CA is written to every namespace already published to."""

    def __init__(self, kube: Any, ca: bytes, name: str = PROGRESS_CA_CONFIGMAP) -> None:
        self.kube, self.name = kube, name
        self._ca = ca.decode()
        self._lock = threading.Lock()
        self._written: dict[str, tuple[float, str]] = {}  # namespace -> (when, CA)

    @property
    def ca(self) -> str:
        return self._ca

    def known(self, namespace: str) -> bool:
        hit = self._written.get(namespace)
        return bool(hit) and hit[1] == self._ca and time.monotonic() - hit[0] < PUBLISHED_TTL

    def ensure(self, namespace: str) -> None:
        """The namespace's ConfigMap holds the current CA (created, or patched)."""
        if self.known(namespace):
            return
        ca = self._ca
        obj = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"namespace": namespace, "name": self.name, "labels": dict(LABELS)},
               "data": {PROGRESS_CA_KEY: ca}}
        current = self.kube.get(obj)
        if current is None:
            current, made = self.kube.create(obj)
            if made:
                log.info("published the progress endpoint's CA to ConfigMap %s/%s", namespace,
                         self.name)
        labels = (current.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY:
            # Someone else's of that name: never overwritten. Its pods' reports fail their
            # TLS check (refused, not sent in the clear) until it is removed or relabelled.
            log.warning("ConfigMap %s/%s is not kubetune's (no label app.kubernetes.io/"
                        "managed-by=kubetune): the progress CA is not written there", namespace,
                        self.name)
        elif (current.get("data") or {}).get(PROGRESS_CA_KEY) != ca:
            self.kube.patch("v1", "ConfigMap", namespace, self.name,
                            {"metadata": {"labels": dict(LABELS)}, "data": {PROGRESS_CA_KEY: ca}})
            log.info("updated the progress endpoint's CA in ConfigMap %s/%s", namespace,
                     self.name)
        with self._lock:
            self._written[namespace] = (time.monotonic(), ca)

    def replace(self, ca: bytes) -> list[str]:
        """A new CA: every namespace published to gets it (errors are logged; each is
        retried by the next ``ensure`` for it). Returns those namespaces."""
        self._ca = ca.decode()
        with self._lock:
            namespaces = sorted(self._written)
        for ns in namespaces:
            try:
                self.ensure(ns)
            except Exception as err:
                log.warning("the progress CA in %s/%s was not updated (%s); retried with its "
                            "next job", ns, self.name, getattr(err, "status", type(err).__name__))
        return namespaces


# ------------------------------------------------------------------------ the endpoint's TLS


class ProgressTls:
    """What the endpoint serves (``context``; None: plain HTTP, named in the URL) and what
    pods get (``publisher``; None: the user's ConfigMap, or no endpoint for pods), kept
    current by ``refresh``. Blocking: call from a thread."""

    def __init__(self, config: Any, kube: Any, serving: bool) -> None:
        self.config, self.kube, self.serving = config, kube, serving
        self.context: ssl.SSLContext | None = None
        self.publisher: CaPublisher | None = None
        self.keeper: CertKeeper | None = None
        self._served = b""

    def _current(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, key, CA for pods) as they are now: the user's files, or the
        operator's Secret (renewed first when due)."""
        c = self.config
        if c.progress_tls_cert:
            with open(c.progress_tls_cert, "rb") as f:
                cert = f.read()
            with open(c.progress_tls_key, "rb") as f:
                key = f.read()
            ca = b""
            if c.progress_tls_ca and os.path.exists(c.progress_tls_ca):
                with open(c.progress_tls_ca, "rb") as f:
                    ca = f.read()
                ca = ca if ca.strip() else b""
            return cert, key, ca
        if self.keeper is None:
            if not c.operator_namespace:
                raise ValueError(
                    "the progress endpoint keeps its certificate in a Secret in the "
                    "operator's namespace: set KUBETUNE_OPERATOR_NAMESPACE (or name plain "
                    "HTTP: KUBETUNE_PROGRESS_URL=http://…)")
            self.keeper = CertKeeper(self.kube, c.operator_namespace, c.progress_cert_secret,
                                     hosts_for(c.progress_url))
        bundle = self.keeper.ensure()
        return bundle.tls_crt, bundle.tls_key, bundle.published_ca()

    def start(self) -> None:
        c = self.config
        pods_need_ca = bool(c.progress_url) and not c.progress_plain_http \
            and not c.progress_ca_configmap
        if c.progress_plain_http:
            if self.serving:
                log.warning("progress endpoint: plain HTTP, as KUBETUNE_PROGRESS_URL names it: "
                            "pods' tokens and reports cross the network unencrypted")
            return
        if not self.serving and not pods_need_ca:
            return
        cert, key, ca = self._current()
        if self.serving:
            self.context = server_context(cert, key)
            self._served = cert
            log.info("progress endpoint: HTTPS with %s certificate %s",
                     "the user's" if c.progress_tls_cert else "its own", fingerprint(cert))
        if pods_need_ca:
            if not ca:
                raise ValueError(
                    f"the progress endpoint's certificate ({c.progress_tls_cert}) comes "
                    f"without a CA ({c.progress_tls_ca or 'ca.crt'} is missing) for the "
                    "pods to check it with: name a ConfigMap with ca.crt in every job "
                    "namespace (KUBETUNE_PROGRESS_CA_CONFIGMAP, the chart's "
                    "progress.caConfigMap)")
            self.publisher = CaPublisher(self.kube, ca)

    def refresh(self) -> None:
        """Renew when due, serve what the Secret (or the user's files) hold now, and publish
        a changed CA."""
        if self.context is None and self.publisher is None:
            return
        cert, key, ca = self._current()
        # A new CA reaches the pods first (beside the one it replaces), then its certificate.
        if self.publisher is not None and ca and ca.decode() != self.publisher.ca:
            namespaces = self.publisher.replace(ca)
            log.info("progress endpoint: a new CA, published to %d namespaces",
                     len(namespaces))
        if self.context is not None and cert != self._served:
            load_into(self.context, cert, key)
            self._served = cert
            log.info("progress endpoint: now serving certificate %s", fingerprint(cert))
