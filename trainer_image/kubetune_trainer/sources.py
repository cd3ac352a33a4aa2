"""Turn a source URI into a local path: local, pvc://, embedded://, hf://, and fsspec URLs."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from kubetune.errors import SourceError

from kubetune_trainer.config import RunContext

FSSPEC_SCHEMES = ("s3", "gs", "http", "https")


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
) -> Path:
    """Return a local path for ``uri``; downloads (hf, s3, gs, https) land in the cache.

    ``token_env`` names the variable holding this source's token (the operator sets one per
    secretRef: HF_TOKEN for the model, KUBETUNE_DATASET_<i>_TOKEN for data set i).
    """
    scheme, rest = split_uri(uri)
    if scheme == "":
        path = Path(rest).expanduser()
        return path if path.is_absolute() else ctx.base_dir / path
    if scheme == "file":
        return Path(rest)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        return ctx.pvc_root / claim / sub
    if scheme == "embedded":
        if kind != "model":
            raise SourceError("embedded:// names a bundled model, not a data set", field=field)
        from kubetune_trainer.embedded import materialize

        return materialize(rest, ctx.cache_dir, field=field)
    if scheme == "hf":
        return _hf_download(rest, ctx, field=field, kind=kind, revision=revision,
                            token=os.environ.get(token_env) or os.environ.get("HF_TOKEN"))
    if scheme in FSSPEC_SCHEMES:
        return _fsspec_download(uri, ctx, field=field)
    raise SourceError(f"unsupported scheme {scheme}://", field=field)


def _hf_download(
    rest: str, ctx: RunContext, *, field: str, kind: str, revision: str | None,
    token: str | None,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    parts = rest.split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = snapshot_download(
            repo_id,
            repo_type="dataset" if kind == "dataset" else "model",
            revision=revision,
            token=token or None,
            cache_dir=ctx.cache_dir / "hf",
        )
    except LocalEntryNotFoundError:
        raise SourceError(
            f"hf://{rest} is not in the local cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); pre-fetch it or use a pvc:// or local copy",
            field=field,
        ) from None
    except HfHubHTTPError as err:
        raise SourceError(f"hf://{rest}: {err}", field=field) from None
    return Path(root) / sub


def _fsspec_download(uri: str, ctx: RunContext, *, field: str) -> Path:
    import fsspec

    target = ctx.cache_dir / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "data"
    if (target / ".complete").exists():
        return target / name
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as err:
        raise SourceError(f"{uri}: needs an extra package ({err})", field=field) from None
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fs.isdir(path):
            fs.get(path, str(tmp / name), recursive=True)
        else:
            fs.get(path, str(tmp / name))
    except FileNotFoundError:
        raise SourceError(f"{uri}: not found", field=field) from None
    except Exception as err:  # network and auth errors come in many types
        raise SourceError(f"{uri}: download failed: {err}", field=field) from None
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target / name
