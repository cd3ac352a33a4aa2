"""Prepared (tokenized, masked, packed) sft/pt data, cached by content hash.

The key hashes everything the prepared rows depend on: the data files' bytes and how they are
read (spec.datasets, spec.evalDatasets), the tokenizer (its full definition and chat
template), the template, stage, cutoff, packing, masking options, split, seed, and this
package's data code. A run whose
key is cached loads the Arrow files (memory-mapped) instead of reading and tokenizing again:
a restarted run, and every rank after the first (train.py prepares under
``main_process_first``; a file lock keeps two processes from building the same key at once).
An entry is a directory: the recipe's Arrow files (written there as rows are prepared) and
meta.json.

The cache is bounded: after building an entry, what stopped runs left half-built goes, and
the least recently used others until all fit in ``KUBETUNE_CACHE_PREPARED_GB`` (20 by
default). A run holds a shared lock on the entry it reads for as long as its data lives (data
loader workers reopen the files by path), and an entry held, or being loaded, is never
removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec

CACHED_STAGES = ("sft", "pt")
VERSION = 2  # bump when the layout on disk changes
LIMIT_ENV, LIMIT_GB = "KUBETUNE_CACHE_PREPARED_GB", 20.0
# An entry being built: <entry>.tmp-<host>-<pid> (pods sharing a claim may share pids),
# renamed into place when done.
BUILDING = ".tmp-"
SCRATCH = "scratch-"  # a run's uncached rows (streamed stages), held while it runs
SCRATCH_GRACE_SECONDS = 600  # a scratch directory this new is never taken for a dead run's
# The code that shapes prepared rows: this package's, and the sft recipe's prepare (read as a
# file, not imported: data/ sits below the recipes).
_CODE = [Path(__file__).parent / name for name in ("cache.py", "fastbpe.py", "formats.py",
                                                    "loading.py", "prepared.py",
                                                    "preprocess.py", "templates.py")] + \
    [Path(__file__).parents[1] / "recipes" / "sft.py"]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@functools.cache
def code_digest() -> list[str]:
    """The data code this process runs (read once: what was imported, not later edits)."""
    return [_file_digest(p) for p in _CODE]


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.special_tokens_map,
                         getattr(tokenizer, "eos_token_id", None)], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def key(spec: FineTuneJobSpec, ctx: Any, tokenizer: Any, limit: int | None) -> str | None:
    """The cache key of this run's prepared data, or None when it is not cached (stages
    other than sft/pt)."""
    from kubetune_trainer.data.loading import plan

    if spec.stage not in CACHED_STAGES or limit is not None:  # a validation sample: cheap
        return None
    t = spec.training
    held = spec.eval_datasets or []
    files = [(str(p), p.stat().st_size, _file_digest(p))
             for part in plan(spec.datasets, ctx) + (
                 plan(held, ctx, at="spec.evalDatasets") if held else [])
             for p in part.paths]
    parts = {
        "version": VERSION,
        "code": code_digest(),
        "datasets": [d.model_dump(mode="json") for d in spec.datasets],
        "eval_datasets": [d.model_dump(mode="json") for d in held],
        "files": files,
        "tokenizer": tokenizer_digest(tokenizer),
        "stage": spec.stage, "template": spec.template, "limit": limit,
        "training": {k: getattr(t, k) for k in (
            "cutoff_len", "packing", "train_on_prompt", "mask_history", "eval_split", "seed",
            "max_invalid_fraction")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _top(ctx: Any) -> Path:
    """Where prepared rows live: ``ctx.prepared_dir`` (the job's pvc:// output in a cluster)
    when this process can write there, else the cache directory's ``prepared``."""
    return shared_dir(ctx) or Path(ctx.cache_dir) / "prepared"


def shared_dir(ctx: Any) -> Path | None:
    """``ctx.prepared_dir``, where the pre-flight pod and every training pod meet, if this
    process can write there; None (said once) when it cannot: rows are then prepared in the
    pod's own cache, not shared."""
    where = getattr(ctx, "prepared_dir", None)
    return Path(where) if where is not None and _writable(Path(where)) else None


@functools.cache
def _writable(where: Path) -> bool:
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".probe-{socket.gethostname()}-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError as err:
        print(f"data: {where} is not writable here ({err.strerror or err}): the prepared rows "
              "are kept in this pod only", file=sys.stderr, flush=True)
        return False


def entry(ctx: Any, digest: str) -> Path:
    """The directory of this key's prepared rows (there once built or fetched)."""
    return _dir(ctx, digest)


def _dir(ctx: Any, digest: str) -> Path:
    return _top(ctx) / digest[:32]


def load(ctx: Any, digest: str) -> tuple[Any, list[str]] | None:
    """The cached Data for this key (its Arrow files memory-mapped) and the lines preparing
    it logged, or None."""
    import datasets

    from kubetune_trainer.data.prepared import Data

    root = _dir(ctx, digest)
    meta_file = root / "meta.json"
    if not meta_file.exists():
        return None
    held = _hold(root, fcntl.LOCK_SH)  # for as long as the data sets live (Data.keep)
    os.utime(meta_file)  # used now: the last to go
    meta = json.loads(meta_file.read_text())
    files = {k: datasets.Dataset.from_file(str(root / name)) if name else None
             for k, name in meta["files"].items()}
    return Data(train=files["train"], eval=files["eval"], stats={**meta["stats"], "cached": True},
                eval_examples=meta["eval_examples"], template=meta["template"],
                keep=held), meta["log"]


def _beside(root: Path, suffix: str) -> Path:
    """A file kept next to an entry (its locks, its build directory)."""
    return root.with_name(root.name + suffix)


def _hold(root: Path, how: int) -> Any:
    """``root``'s use lock (a flock: shared by readers, exclusive to remove), or None when
    ``how`` is non-blocking and someone holds it."""
    use = open(_beside(root, ".use"), "a")  # noqa: SIM115 (kept open: the lock)
    try:
        fcntl.flock(use, how)
    except BlockingIOError:
        use.close()
        return None
    return use


def limit_bytes() -> int:
    """The cache's size limit from the environment (GB; 0 keeps only the entry in use)."""
    from kubetune.errors import KubetuneError

    raw = os.environ.get(LIMIT_ENV, "").strip()
    try:
        gb = float(raw) if raw else LIMIT_GB
    except ValueError:
        gb = -1.0
    if not 0 <= gb < float("inf"):
        raise KubetuneError(f"{raw!r} is not a size: a number of GB, 0 or more", field=LIMIT_ENV)
    return int(gb * 2**30)


def prune(ctx: Any, current: str, limit: int) -> list[str]:
    """Remove what a stopped run left half-built, then the least recently used entries other
    than ``current`` until every entry fits in ``limit`` bytes; entries in use (held, or
    locked while loaded or built) stay. Returns the names removed."""
    from filelock import FileLock, Timeout

    top = _top(ctx)
    keep = _dir(ctx, current)
    entries, total, removed = [], 0, []
    for entry in top.iterdir():
        meta = entry / "meta.json"
        if entry.name.startswith(SCRATCH) and entry.is_dir():
            if _dead_scratch(entry):
                removed.append(entry.name)
            continue
        if BUILDING in entry.name and entry.is_dir():
            # A build holds its key's lock from start to rename: free, this one's builder died.
            try:
                with FileLock(_beside(top / entry.name.split(BUILDING)[0], ".lock"), timeout=0):
                    shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            except Timeout:
                pass
            continue
        if not entry.is_dir() or not meta.exists():
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        total += size
        if entry != keep:
            entries.append((meta.stat().st_mtime, size, entry))
    for _, size, entry in sorted(entries, key=lambda e: e[0]):  # least recently used first
        if total <= limit:
            break
        try:
            with FileLock(_beside(entry, ".lock"), timeout=0):
                held = _hold(entry, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if held is None:
                    continue
                with held:
                    shutil.rmtree(entry, ignore_errors=True)
                    # (no reader is between its check and its lock: it checks under the file lock)
                    _beside(entry, ".use").unlink(missing_ok=True)
        except Timeout:
            continue
        total -= size
        removed.append(entry.name)
    return removed


def _dead_scratch(entry: Path) -> bool:
    """Remove a scratch directory whose run is gone (its lock free: a killed pod's), unless
    it is new (made, not yet locked). True when removed."""
    import time

    if time.time() - entry.stat().st_mtime < SCRATCH_GRACE_SECONDS:
        return False
    held = _hold(entry, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if held is None:
        return False
    with held:
        shutil.rmtree(entry, ignore_errors=True)
        _beside(entry, ".use").unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def building(ctx: Any, digest: str) -> Iterator[Path]:
    """A scratch directory for this key's files, put in its place when the block ends
    (atomically: a crash leaves no half-written entry, and no scratch)."""
    root = _dir(ctx, digest)
    tmp = _beside(root, f"{BUILDING}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def save(work: Path, data: Any, lines: list[str]) -> None:
    """The description of ``data``, whose data sets are Arrow files under ``work``."""
    def name(ds: Any) -> str | None:
        if ds is None:
            return None
        return str(Path(ds.cache_files[0]["filename"]).relative_to(work))

    (work / "meta.json").write_text(json.dumps({
        "files": {"train": name(data.train), "eval": name(data.eval)},
        "stats": data.stats, "eval_examples": data.eval_examples, "template": data.template,
        "log": lines}))


def scratch(ctx: Any) -> Any:
    """A temporary directory beside the cache for prepared rows that are not cached, locked
    while this run holds it (a killed run's is removed by the next ``prune``)."""
    import tempfile
    import weakref

    root = _top(ctx)
    root.mkdir(parents=True, exist_ok=True)
    work = tempfile.TemporaryDirectory(dir=root, prefix=SCRATCH)
    use = _hold(Path(work.name), fcntl.LOCK_EX)
    weakref.finalize(work, _release, use, _beside(Path(work.name), ".use"))
    return work


def _release(use: Any, path: Path) -> None:
    path.unlink(missing_ok=True)
    use.close()


def lock(ctx: Any, digest: str) -> Any:
    """A lock for building this key (a file lock: works across processes and pods sharing
    the cache directory)."""
    from filelock import FileLock

    root = _dir(ctx, digest)
    root.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(_beside(root, ".lock"))
