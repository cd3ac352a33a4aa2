"""Spectrum (Hartford et al. 2024): train only the weight matrices with the most signal.

Each 2-D weight of a decoder layer is scored by its signal-to-noise ratio: the noise level σ is
estimated from the spread of its singular values (interquartile range / 1.349, as for a
Gaussian), singular values above the Marchenko–Pastur edge σ·(1 + √(min/max dims)) count as
signal, the rest as noise, and the ratio is divided by the largest singular value. Within each
module type (``self_attn.q_proj``, ``mlp.down_proj``, …) the top ``topFraction`` of the layers
train; everything else (embeddings, norms, other layers) stays frozen.

The scan reads every weight once (an SVD each), so its result is cached as JSON under
``$KUBETUNE_CACHE/spectrum`` (default ``~/.cache/kubetune/spectrum``), keyed by the model's
path, revision, config and weight files (name, size, modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError

_LAYER = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<module>.+)\.weight$")


def cache_dir() -> Path:
    root = os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune"
    return Path(root) / "spectrum"


def model_key(model_path: Path, revision: str | None) -> str:
    """What identifies one model's weights: path, revision, config and weight files."""
    h = hashlib.sha256()
    h.update(f"{model_path.resolve()}\n{revision or ''}\n".encode())
    config = model_path / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for f in sorted([*model_path.glob("*.safetensors"), *model_path.glob("*.bin")]):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def snr(weight: Any) -> float:
    """The weight matrix's signal-to-noise ratio over its largest singular value."""
    import torch

    s = torch.linalg.svdvals(weight.detach().float())
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    rows, cols = weight.shape
    edge = sigma * (1 + (min(rows, cols) / max(rows, cols)) ** 0.5)
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    ratio = float(signal / noise) if noise > 0 else float("inf")
    return ratio / float(s[0]) if s[0] > 0 else 0.0


def scan(model: Any) -> dict[str, dict[str, float]]:
    """module type → {parameter name: SNR} for every 2-D weight inside the decoder layers."""
    out: dict[str, dict[str, float]] = {}
    for name, p in model.named_parameters():
        m = _LAYER.match(name)
        if m is None or p.dim() != 2:
            continue
        out.setdefault(m["module"], {})[name] = snr(p)
    return out


def cached_scan(model: Any, model_path: Path, revision: str | None, *,
                log=print) -> dict[str, dict[str, float]]:
    """``scan``, from the cache when this model was scanned before."""
    path = cache_dir() / f"{model_key(model_path, revision)}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("model") == str(model_path.resolve()) and isinstance(data["snr"], dict):
                return data["snr"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: scan again and overwrite it
    log(f"spectrum: scanning the signal-to-noise ratio of {model_path.name}'s weights")
    result = scan(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model": str(model_path.resolve()), "revision": revision,
                               "snr": result}, indent=1))
    tmp.replace(path)
    return result


def select(snrs: dict[str, dict[str, float]], top_fraction: float) -> list[str]:
    """The parameter names to train: the top fraction (at least one) of each module type."""
    chosen = []
    for scores in snrs.values():
        k = max(1, round(top_fraction * len(scores)))
        chosen += sorted(scores, key=lambda n: (-scores[n], n))[:k]
    return sorted(chosen)


def apply_spectrum(model: Any, spec: FineTuneJobSpec, *, log=print) -> list[str]:
    """Freeze everything but the weights Spectrum picks; returns their names."""
    path = Path(getattr(model, "name_or_path", "") or model.config._name_or_path)
    snrs = cached_scan(model, path, spec.model.revision, log=log)
    if not snrs:
        raise KubetuneError("method.spectrum found no decoder-layer weight matrices in this "
                            "model", field="spec.method.spectrum")
    chosen = set(select(snrs, spec.method.spectrum.top_fraction))
    head = getattr(model.config, "num_labels", None) == 1 and hasattr(model, "score")
    for name, p in model.named_parameters():  # a reward model's new head trains too
        p.requires_grad_(name in chosen or (head and name.startswith("score.")))
    total = sum(len(v) for v in snrs.values())
    log(f"spectrum: training {len(chosen)} of {total} weight matrices "
        f"(top {spec.method.spectrum.top_fraction:g} per module type by SNR)")
    return sorted(chosen)
