"""What the API server can do, from its version. Pure: no I/O.

The operator reads the version once at startup (``GET /version``, ``kube.Kube.server``)
into its state (``memo.server``) and hands it to rendering: a field the server does not know is
never rendered (a 1.20 server prunes unknown fields silently, and the object it keeps is not
the one we meant). ``kubetune render`` has no cluster: it renders for ``CURRENT``.

Each feature counts from the release where it is on by default (beta), not from GA:
Indexed Jobs (``completionMode``) and Job ``suspend`` beta 1.22; ``ttlSecondsAfterFinished``
beta 1.21; ``podFailurePolicy`` (with the ``DisruptionTarget`` pod condition) beta 1.26;
``podReplacementPolicy`` alpha 1.28, beta 1.29.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ApiServer:
    major: int
    minor: int
    git_version: str = ""  # as the server says it, e.g. v1.20.15 (for messages)

    @classmethod
    def from_version(cls, info: Mapping[str, Any]) -> ApiServer:
        """From ``GET /version``: ``major``/``minor`` ("1", "20+" on some distributions), or
        ``gitVersion`` when those are empty; ValueError when neither says."""
        git = str(info.get("gitVersion") or "")
        major, minor = (re.match(r"\d+", str(info.get(k) or "")) for k in ("major", "minor"))
        if major and minor:
            return cls(int(major.group()), int(minor.group()), git)
        parsed = re.match(r"v?(\d+)\.(\d+)", git)
        if parsed is None:
            raise ValueError(f"the API server's version is unreadable: {dict(info)!r}")
        return cls(int(parsed.group(1)), int(parsed.group(2)), git)

    @property
    def version(self) -> str:
        return self.git_version or f"v{self.major}.{self.minor}"

    def at_least(self, minor: int) -> bool:
        return (self.major, self.minor) >= (1, minor)

    @property
    def indexed_jobs(self) -> bool:
        """batch/v1 Job ``completionMode: Indexed`` (and the completion index on each pod)."""
        return self.at_least(22)

    @property
    def job_suspend(self) -> bool:
        """batch/v1 Job ``spec.suspend`` (what Kueue's Job integration needs)."""
        return self.at_least(22)

    @property
    def job_ttl(self) -> bool:
        """batch/v1 Job ``spec.ttlSecondsAfterFinished``."""
        return self.at_least(21)

    @property
    def pod_failure_policy(self) -> bool:
        """batch/v1 Job ``spec.podFailurePolicy`` and the ``DisruptionTarget`` condition."""
        return self.at_least(26)

    @property
    def pod_replacement_policy(self) -> bool:
        """batch/v1 Job ``spec.podReplacementPolicy``."""
        return self.at_least(29)


# What `kubetune render` renders for (no cluster to ask): a current release.
CURRENT = ApiServer(1, 33, "v1.33.0")
