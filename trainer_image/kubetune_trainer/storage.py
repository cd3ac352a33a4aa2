"""Outputs in an object store (s3://, gs://): staged on local disk, uploaded as each part is
complete, resumed from the store.

The run writes under a local staging directory exactly as it writes a local output (every
guarantee of ``outputs`` holds there). Each checkpoint is uploaded once its complete marker is
written, the marker last, so a checkpoint in the store without its marker is never resumed
from; checkpoints that training.saveTotalLimit rotated away are removed from the store too.
On several nodes each node stages the files its own ranks write (DeepSpeed's optimizer
partitions, RNG states): every node's local main process uploads its node's part, all
processes wait, then global rank 0 uploads the marker. A restarted run (fresh pods: empty
staging) downloads the newest complete checkpoint from the store on every node and resumes
from it. At the end the adapter / merged model / model, predictions, loss
plot, progress and (last) result.json are uploaded; the status then points at the store.

Any failure of the store (unreachable, missing bucket, refused credentials, forbidden upload)
ends the run with one line naming the field; what was uploaded stays.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.credentials import SourceSecret, output_secret
from kubetune.errors import KubetuneError, OutputError, SourceError

from kubetune_trainer.config import RunContext

STORE_SCHEMES = ("s3", "gs")
CHECKPOINTS = "checkpoints"
RUNS_FILE = "tracking.json"  # tracking.RUNS_FILE (not imported: it pulls no more than this)


def scheme(uri: str) -> str:
    return uri.partition("://")[0] if "://" in uri else ""


def is_store(uri: str) -> bool:
    return scheme(uri) in STORE_SCHEMES


def is_remote(uri: str) -> bool:
    """Written elsewhere than this machine's disk: an object store or the Hub."""
    return scheme(uri) in (*STORE_SCHEMES, "hf")


def staging_root(uri: str, ctx: RunContext) -> Path:
    """Where a remote output is staged on this machine (the pod's scratch volume)."""
    return ctx.cache_dir / "staging" / hashlib.sha256(uri.encode()).hexdigest()[:16]


# A network failure is one line after one retry, in seconds: before a download (or the output
# store's write check) the host that serves it takes a TCP connection within CONNECT_TIMEOUT, or
# once more RETRY_PAUSE later. (gcsfs alone retries each request six times, up to 32 s apart:
# 85 s offline before its error.)
CONNECT_TIMEOUT = 5.0
RETRY_PAUSE = 1.0


def endpoint(uri: str, secret: SourceSecret | None) -> tuple[str, int, str] | None:
    """The (host, port, what) a transfer of ``uri`` first connects to: the URL's own host, the
    store's endpoint, or the proxy that the environment routes it through ("the proxy for …").
    None where the library decides (s3:// on AWS's regional endpoints: botocore's own 3
    attempts)."""
    from urllib.request import getproxies, proxy_bypass

    scheme = uri.partition("://")[0]
    if scheme in ("http", "https"):
        url = uri
    elif scheme == "gs":  # gcsfs: the emulator's address when set, else Google's endpoint
        url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    elif scheme == "s3":
        url = ((secret.get("AWS_ENDPOINT_URL") if secret else None)
               or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        if not url:
            return None
    else:
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(parts.hostname):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if via.hostname:
            return via.hostname, via.port or 80, f"the proxy for {parts.hostname}, "
    return parts.hostname, port, ""


def reach(uri: str, secret: SourceSecret | None, *, field: str,
          cls: type[KubetuneError] = SourceError) -> None:
    """One line (``cls``, naming ``field``) when the host serving ``uri`` takes no
    connection, twice, RETRY_PAUSE apart: a download's source, or the output store."""
    import socket
    import time

    target = endpoint(uri, secret)
    if target is None:
        return
    host, port, what = target
    why = ""
    for attempt in range(2):
        if attempt:
            time.sleep(RETRY_PAUSE)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
            return
        except OSError as err:
            why = " ".join(str(err).split()) or type(err).__name__
    from kubetune.urls import redact

    instead = ", or copy it to a pvc:// or local path" if cls is SourceError else ""
    raise cls(f"{redact(uri)}: {what}{host}:{port} cannot be reached: {why} (tried twice, "
              f"{RETRY_PAUSE:g} s apart, {CONNECT_TIMEOUT:g} s each); check the network and "
              f"proxy settings{instead}", field=field)

def storage_options(uri: str, secret: SourceSecret | None) -> dict[str, Any]:
    """fsspec options carrying ``secret`` for ``uri``: S3 keys, endpoint and region; a GCS
    service-account key. Without a secret: the libraries' own defaults (environment,
    workload identity)."""
    s = scheme(uri)
    opts: dict[str, Any] = {}
    if s == "gs":
        # gcsfs logs every failed request with a traceback before it raises; the failure is
        # said once, in one line (store_error, source_error).
        import logging

        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    if s == "s3":
        # Fail in seconds, not minutes, when the endpoint does not answer.
        opts["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 60,
                                 "retries": {"max_attempts": 3, "mode": "standard"}}
        if secret is not None:
            opts["key"] = secret.require("AWS_ACCESS_KEY_ID")
            opts["secret"] = secret.require("AWS_SECRET_ACCESS_KEY")
            if token := secret.get("AWS_SESSION_TOKEN"):
                opts["token"] = token
            if endpoint := secret.get("AWS_ENDPOINT_URL"):
                opts["endpoint_url"] = endpoint
            if region := secret.get("AWS_REGION"):
                opts["client_kwargs"] = {"region_name": region}
    elif s == "gs" and secret is not None:
        import json

        raw = secret.require()
        try:
            opts["token"] = json.loads(raw)
        except ValueError:
            raise KubetuneError("the Secret's key does not hold a service-account JSON key",
                                field=secret.field) from None
    return opts


def store_error(exc: BaseException, where: str, *, field: str, secret_field: str | None,
                cls: type[KubetuneError] = OutputError) -> KubetuneError:
    """One line for a store failure, naming the field to fix."""
    from kubetune.urls import redact_text

    text = redact_text(" ".join(str(exc).split())) or type(exc).__name__
    low = text.lower()
    name = type(exc).__name__
    if any(s in low for s in ("access key id", "invalidaccesskeyid", "signaturedoesnotmatch",
                              "security token", "invalid_grant", "invalid credentials",
                              "unable to locate credentials", "no credentials")):
        return cls(f"{where}: the store refused the credentials ({text})",
                   field=secret_field or field)
    if "bucket does not exist" in low or "nosuchbucket" in low:
        return cls(f"{where}: the bucket does not exist ({text})", field=field)
    if isinstance(exc, PermissionError) or "accessdenied" in low or "forbidden" in low:
        return cls(f"{where}: forbidden ({text}); the credentials need read and write "
                   "access there", field=secret_field or field)
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                "ClientConnectorError", "ConnectionRefusedError", "ReadTimeoutError") or \
            "could not connect" in low or "connection refused" in low:
        return cls(f"{where}: the store cannot be reached ({text})", field=field)
    return cls(f"{where}: {name}: {text}", field=field)


@dataclass
class Store:
    """The output location in an object store."""

    uri: str
    fs: Any
    root: str  # bucket/prefix, as the file system names it
    secret_field: str | None
    secret: SourceSecret | None = None  # its endpoint, for the reachability check

    FIELD = "spec.output.uri"

    @classmethod
    def for_output(cls, spec: Any) -> Store | None:
        uri = spec.output.uri.rstrip("/")
        if not is_store(uri):
            return None
        import fsspec

        secret = output_secret(spec)
        try:
            fs, root = fsspec.core.url_to_fs(
                uri, use_listings_cache=False, **storage_options(uri, secret))
        except ImportError as err:
            raise OutputError(f"{uri}: needs an extra package ({err})", field=cls.FIELD
                              ) from None
        return cls(uri, fs, root.rstrip("/"), secret.field if secret else None, secret)

    def _fault(self, exc: BaseException, doing: str) -> KubetuneError:
        return store_error(exc, f"{doing} {self.uri}", field=self.FIELD,
                           secret_field=self.secret_field)

    def _call(self, doing: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except KubetuneError:
            raise
        except Exception as exc:  # botocore, aiohttp, google-auth errors: many types
            raise self._fault(exc, doing) from None

    def check(self) -> str:
        """Before the model loads: the store answers, the bucket exists, and it takes a file
        (written and removed)."""
        probe = f"{self.root}/.kubetune-write-check-{os.getpid()}"
        reach(self.uri, self.secret, field=self.FIELD, cls=OutputError)
        try:
            self.fs.pipe_file(probe, b"ok")
        except FileNotFoundError as exc:  # writing a new object: only its bucket can be missing
            bucket = self.root.split("/", 1)[0]
            raise OutputError(f"writing to {self.uri}: the bucket {bucket!r} does not exist "
                              f"({' '.join(str(exc).split())})", field=self.FIELD) from None
        except Exception as exc:
            raise self._fault(exc, "writing to") from None
        self._call("writing to", self.fs.rm_file, probe)
        return f"output: {self.uri} writable (staged locally, uploaded as each part is done)"

    # ----------------------------------------------------------------- upload

    def put_dir(self, local: Path, rel: str, *, last: str | None = None) -> None:
        """Upload every file under ``local`` to ``rel``; the file named ``last`` after the
        others (a complete marker: its presence in the store means the rest is there)."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        for p in files:
            self.put_file(p, f"{rel}/{p.relative_to(local).as_posix()}")

    def put_file(self, local: Path, rel: str) -> None:
        self._call("uploading to", self.fs.put_file, str(local), f"{self.root}/{rel}")

    def remove(self, rel: str) -> None:
        self._call("removing from", self.fs.rm, f"{self.root}/{rel}", recursive=True)

    # ----------------------------------------------------------------- resume

    def checkpoints(self) -> list[tuple[int, str]]:
        """Checkpoints in the store with their complete marker, oldest first."""
        from kubetune_trainer.progress import COMPLETE_MARKER

        base = f"{self.root}/{CHECKPOINTS}"
        if not self._call("listing", self.fs.exists, base):
            return []
        found = []
        for entry in self._call("listing", self.fs.ls, base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            step = name.removeprefix("checkpoint-")
            if name.startswith("checkpoint-") and step.isdigit() and self._call(
                    "listing", self.fs.exists, f"{base}/{name}/{COMPLETE_MARKER}"):
                found.append((int(step), name))
        return sorted(found)

    def get_dir(self, rel: str, local: Path) -> None:
        """Download ``rel`` into ``local`` (written beside it, then renamed)."""
        tmp = local.with_name(f".download-{local.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        src = f"{self.root}/{rel}"
        for remote in self._call("listing", self.fs.find, src):
            target = tmp / remote[len(src):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call("downloading from", self.fs.get_file, remote, str(target))
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)

    def has(self, rel: str) -> bool:
        return bool(self._call("listing", self.fs.exists, f"{self.root}/{rel}"))

    def get_file(self, rel: str, local: Path) -> bool:
        remote = f"{self.root}/{rel}"
        if not self._call("listing", self.fs.exists, remote):
            return False
        tmp = local.with_name(local.name + ".tmp")
        self._call("downloading from", self.fs.get_file, remote, str(tmp))
        tmp.rename(local)
        return True

    def restore(self, out: Any, log: Any) -> None:
        """Bring the newest complete checkpoint in the store (and progress.jsonl) into the
        staging directory when it is newer than what is staged here already."""
        from kubetune_trainer.progress import find_resume

        remote = self.checkpoints()
        if not remote:
            return
        step, name = remote[-1]
        local = find_resume(out.checkpoints).path
        if local is not None and int(local.name.rsplit("-", 1)[-1]) >= step:
            return
        out.checkpoints.mkdir(parents=True, exist_ok=True)
        log(f"output: downloading {name} from {self.uri} to resume from it")
        self.get_dir(f"{CHECKPOINTS}/{name}", out.checkpoints / name)
        self.get_file(out.progress.name, out.progress)
        self.get_file(RUNS_FILE, out.root / RUNS_FILE)  # continue the trackers' runs

    # ----------------------------------------------------------------- during the run

    def upload_node_part(self, out: Any, step: int) -> None:
        """This node's files of checkpoint ``step``, all but the complete marker. On several
        nodes each stages its own part (DeepSpeed's per-rank optimizer partitions, RNG
        states); every node's local main process uploads its part."""
        from kubetune_trainer.progress import COMPLETE_MARKER

        ckpt = out.checkpoints / f"checkpoint-{step}"
        if not ckpt.is_dir():
            return
        for p in sorted(p for p in ckpt.rglob("*") if p.is_file()):
            if p.name != COMPLETE_MARKER:
                self.put_file(p, f"{CHECKPOINTS}/{ckpt.name}/{p.relative_to(ckpt).as_posix()}")

    def commit_checkpoint(self, out: Any, step: int) -> None:
        """Global rank 0, once every node's part is in the store: the complete marker (when
        the checkpoint was marked), then progress.jsonl; checkpoints no longer kept locally
        (saveTotalLimit) are removed from the store."""
        from kubetune_trainer.progress import COMPLETE_MARKER

        name = f"checkpoint-{step}"
        marker = out.checkpoints / name / COMPLETE_MARKER
        if not marker.exists():
            return
        self.put_file(marker, f"{CHECKPOINTS}/{name}/{COMPLETE_MARKER}")
        for extra in (out.progress, out.root / RUNS_FILE):
            if extra.exists():
                self.put_file(extra, extra.name)
        kept = {p.name for p in out.checkpoints.glob("checkpoint-*")}
        for old_step, old in self.checkpoints():
            if old not in kept and old_step < step:
                self.remove(f"{CHECKPOINTS}/{old}")

    def upload_checkpoint(self, out: Any, step: int) -> None:
        """One process alone: the checkpoint's files, the marker last."""
        self.upload_node_part(out, step)
        self.commit_checkpoint(out, step)

    def upload_outputs(self, out: Any, names: list[str]) -> dict[str, str]:
        """Upload the named entries of the staging directory (directories whole), result.json
        last. Returns name -> URI in the store."""
        uris = {}
        for name in sorted(names, key=lambda n: n == out.result.name):
            p = out.root / name
            if p.is_dir():
                self.put_dir(p, name)
            elif p.is_file():
                self.put_file(p, name)
            else:
                continue
            uris[name] = f"{self.uri}/{name}"
        return uris


def uploader(store: Store, out: Any) -> Any:
    """A callback (after CheckpointMarker) that uploads each checkpoint once it is marked
    complete: every node's local main process uploads what its node staged, all processes
    wait, then global rank 0 uploads the marker last. A failure on any node stops every
    process with that node's message (none is left waiting at a barrier)."""
    from transformers import TrainerCallback

    from kubetune_trainer.progress import rank_zero

    class Uploader(TrainerCallback):
        def on_save(self, args, state, control, **_: Any) -> None:
            from accelerate import PartialState

            ps = PartialState()
            step = state.global_step
            _together(ps, ps.is_local_main_process, store.upload_node_part, out, step)
            _together(ps, rank_zero(), store.commit_checkpoint, out, step)
            if ps.is_local_main_process and not rank_zero():
                # transformers rotates (saveTotalLimit) on rank 0's node only: drop here what
                # the store no longer keeps.
                prune_to(out, {name for _, name in store.checkpoints()}, step)

    return Uploader()


def _together(ps: Any, mine: bool, fn: Any, *args: Any) -> None:
    """``fn`` where ``mine``; then every process learns whether it failed anywhere and raises
    the first failure (its message and field)."""
    failure = own = None
    if mine:
        try:
            fn(*args)
        except KubetuneError as err:
            failure, own = (err.message, err.field), err
    if ps.num_processes > 1:
        from accelerate.utils import gather_object

        failures = [f for f in gather_object([failure]) if f is not None]
    else:
        failures = [failure] if failure else []
    if own is not None:
        raise own
    if failures:
        message, field = failures[0]
        raise OutputError(message, field=field)


def prune_to(out: Any, stored: set[str], step: int) -> None:
    """Remove this node's staged checkpoints older than ``step`` that are not in ``stored``."""
    for ckpt in out.checkpoints.glob("checkpoint-*"):
        old = ckpt.name.removeprefix("checkpoint-")
        if old.isdigit() and int(old) < step and ckpt.name not in stored:
            shutil.rmtree(ckpt, ignore_errors=True)


def source_error(exc: BaseException, shown: str, *, field: str,
                 secret: SourceSecret | None) -> KubetuneError:
    """A download's failure, as one line naming the source or its secretRef."""
    return store_error(exc, shown, field=field, secret_field=secret.field if secret else None,
                       cls=SourceError)
