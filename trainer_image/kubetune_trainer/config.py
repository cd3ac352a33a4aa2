"""Where a run finds things on this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PREPARED_ENV = "KUBETUNE_PREPARED_DIR"


def default_cache_dir() -> Path:
    root = os.environ.get("KUBETUNE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "kubetune" if root else Path.home() / ".cache" / "kubetune"


@dataclass(frozen=True)
class RunContext:
    """Set by the local runner, or by the pod's arguments in a cluster."""

    base_dir: Path = field(default_factory=Path.cwd)  # relative paths resolve against it
    pvc_root: Path = Path("/mnt/pvc")  # pvc://CLAIM/path -> pvc_root/CLAIM/path
    cache_dir: Path = field(default_factory=default_cache_dir)
    # Prepared rows (data/cache.py): under cache_dir unless set; in a cluster the operator puts
    # them on the job's pvc:// output, where the pre-flight pod leaves them for training.
    prepared_dir: Path | None = field(default_factory=lambda: Path(os.environ[PREPARED_ENV])
                                      if os.environ.get(PREPARED_ENV) else None)
