"""spec.output: where the run writes its results."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kubetune.api.v1alpha1._base import OUTPUT_PATTERN, _Spec, immutable


class OutputSpec(_Spec):
    """Where the run writes checkpoints, progress, the adapter and the model."""

    uri: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2048,
            pattern=OUTPUT_PATTERN,
            json_schema_extra=immutable("spec.output.uri"),
            description="Where checkpoints, adapter and merged model go: a local path or "
            "pvc://CLAIM/path (object stores are planned).",
        ),
    ]
    merge: Annotated[
        bool, Field(description="Also save base + adapter merged into one model (LoRA).")
    ] = False
