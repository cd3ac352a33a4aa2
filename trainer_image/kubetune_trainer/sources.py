"""Turn a source URI into a local path: local, pvc://, embedded://, hf://, and fsspec URLs."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kubetune.credentials import SourceSecret
from kubetune.errors import KubetuneError, SourceError
from kubetune.urls import hf_message, hf_problem, redact_text, scrub

from kubetune_trainer.config import RunContext

FSSPEC_SCHEMES = ("s3", "gs", "http", "https")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def redact(uri: str) -> str:
    """``uri`` fit to print (``kubetune.urls.redact``, the one redaction)."""
    return redact_text(uri)


def _file_name(uri: str, content: Path | None = None) -> str:
    """The cached file's name: the URL path's last part (no query, no credentials), or, when
    that is not a plain file name, the content's hash with the same extension."""
    base = unquote(urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1])
    if _SAFE_NAME.match(base):
        return base
    digest = hashlib.sha256(content.read_bytes() if content and content.is_file() else
                            uri.encode()).hexdigest()[:16]
    ext = re.search(r"(\.[A-Za-z0-9]{1,8}){1,2}$", base)
    return digest + (ext.group(0) if ext else "")


def _may_send_token(uri: str) -> bool:
    """A bearer token goes over https, or plain http to this machine only."""
    parts = urlsplit(uri)
    if parts.scheme == "https":
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def split_uri(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    return (scheme, rest) if sep else ("", uri)


def resolve(
    uri: str,
    ctx: RunContext,
    *,
    field: str,
    kind: str = "model",
    revision: str | None = None,
    token_env: str = "HF_TOKEN",
    light: bool = False,
    secret: SourceSecret | None = None,
) -> Path:
    """Return a local path for ``uri``; downloads (hf, s3, gs, https) land in the cache.

    ``secret``: this source's secretRef (``kubetune.credentials``): a bearer token for hf://
    and https://, S3 keys/endpoint/region for s3://, a service-account key for gs://.
    Without it, ``token_env`` names a variable holding the token.
    ``light``: of an hf:// model only config and tokenizer files, never the weights
    (validate, estimate).
    """
    scheme, rest = split_uri(uri)
    if scheme == "":
        path = Path(rest).expanduser()
        return path if path.is_absolute() else ctx.base_dir / path
    if scheme == "file":
        return Path(rest)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        path = ctx.pvc_root / claim / sub
        try:
            top, real = (ctx.pvc_root / claim).resolve(), path.resolve()
        except (OSError, RuntimeError):  # a loop of links
            raise SourceError(f"{uri}: a loop of links on the claim {claim}",
                              field=field) from None
        if real != top and not real.is_relative_to(top):
            raise SourceError(f"{uri}: resolves outside the claim {claim} (a '..' or a link "
                              "out of it); only what is on the claim is read", field=field)
        return path
    if scheme == "embedded":
        if kind != "model":
            raise SourceError("embedded:// names a bundled model, not a data set", field=field)
        from kubetune_trainer.embedded import materialize

        return materialize(rest, ctx.cache_dir, field=field)
    if scheme == "hf":
        # Config and tokenizer (``light``) are fetched without the Secret when it is not here:
        # a public model needs none. Only when the Hub then refuses is the Secret asked for.
        token = (secret.token() if light else secret.require()) if secret else None
        return _hf_download(rest, ctx, field=field, kind=kind, revision=revision,
                            token=token or os.environ.get(token_env)
                            or os.environ.get("HF_TOKEN"), light=light,
                            missing=secret if secret and not token else None)
    if scheme in FSSPEC_SCHEMES:
        if secret is not None:
            token = secret.require() if scheme in ("http", "https") else None
        else:  # HF_TOKEN is for the Hub: only a source's own secretRef goes to another host.
            token = os.environ.get(token_env) if token_env != "HF_TOKEN" else None
        return _fsspec_download(uri, ctx, field=field, token=token, secret=secret)
    raise SourceError(f"unsupported scheme {scheme}://", field=field)


# What describes a model without its weights: config, tokenizer, chat template.
LIGHT_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _hf_download(
    rest: str, ctx: RunContext, *, field: str, kind: str, revision: str | None,
    token: str | None, light: bool = False, missing: SourceSecret | None = None,
) -> Path:
    """``missing``: the secretRef whose token is not here; named when the Hub refuses."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if hf_problem(f"hf://{rest}"):  # the spec's own rule; here for a spec read elsewhere
        raise SourceError(hf_message(field))
    parts = rest.split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = snapshot_download(
            repo_id,
            repo_type="dataset" if kind == "dataset" else "model",
            revision=revision,
            token=token or None,
            cache_dir=ctx.cache_dir / "hf",
            allow_patterns=LIGHT_PATTERNS if light and kind == "model" else None,
        )
    except LocalEntryNotFoundError:
        raise SourceError(
            f"hf://{rest} is not in the local cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); pre-fetch it or use a pvc:// or local copy",
            field=field,
        ) from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if missing is not None and status in (401, 403):  # gated or private: a token is due
            try:
                missing.require()
            except KubetuneError as no_token:
                raise SourceError(f"hf://{rest}: the Hub answered {status} without a token; "
                                  f"{no_token.message}", field=missing.field) from None
        raise SourceError(f"hf://{rest}: {redact(str(err))}", field=field) from None
    return Path(root) / sub


def _fsspec_download(uri: str, ctx: RunContext, *, field: str, token: str | None = None,
                     secret: SourceSecret | None = None) -> Path:
    """Download into the cache, once. ``token``: sent as ``Authorization: Bearer`` to https://
    (and loopback http://) sources. Nothing printed or stored carries the URL's credentials:
    messages show ``redact(uri)``, the cache directory is a hash, the file is named by its
    path's last part or its content's hash."""
    import fsspec

    shown = redact(uri)
    target = ctx.cache_dir / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return target / (target / ".complete").read_text().strip()
    from kubetune_trainer.storage import reach, source_error, storage_options

    options: dict = storage_options(uri, secret)
    if token and uri.startswith(("http://", "https://")):
        if not _may_send_token(uri):
            raise SourceError(f"{shown}: a secretRef token is only sent over https://",
                              field=field)
        options["headers"] = {"Authorization": f"Bearer {token}"}
    reach(uri, secret, field=field)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as err:
        raise SourceError(f"{shown}: needs an extra package ({err})", field=field) from None
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fetched = tmp / "download"
    try:
        if fs.isdir(path):
            fs.get(path, str(fetched), recursive=True)
        else:  # not fs.get: it reads `?` in a URL's query as a glob
            with fs.open(path, "rb") as src, open(fetched, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():
            raise source_error(err, shown, field=field, secret=secret) from None
        raise SourceError(f"{shown}: not found", field=field) from None
    except Exception as err:  # network and auth errors come in many types
        if uri.startswith(("s3://", "gs://")):
            raise source_error(err, shown, field=field, secret=secret) from None
        raise SourceError(f"{shown}: download failed: {scrub(str(err), uri)}",
                          field=field) from None
    name = _file_name(uri, fetched if fetched.is_file() else None)
    fetched.rename(tmp / name)
    (tmp / ".complete").write_text(name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target / name
