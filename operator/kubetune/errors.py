"""Errors a user can act on: each names the field (or file) and what is allowed."""

from __future__ import annotations


class KubetuneError(Exception):
    """A problem with the job's input; ``field`` is the spec path it concerns."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    # What the trainer writes to /dev/termination-log for the operator to classify.
    reason = "InvalidInput"


class DataError(KubetuneError):
    reason = "DataError"


class SourceError(KubetuneError):
    reason = "SourceError"


class OutputError(KubetuneError):
    """The output location cannot take the run's files: read-only, not a directory, full."""

    reason = "OutputError"
