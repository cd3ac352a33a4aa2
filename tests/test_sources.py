"""Sources: local, pvc://, http(s) through fsspec (a real server on loopback), hf://, embedded."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.errors import SourceError
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.loading import load_examples
from kubetune_trainer.sources import resolve


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_dataset_over_http_is_downloaded_once_into_the_cache(http_root, tmp_path):
    root, url = http_root
    (root / "d.json").write_text(json.dumps([{"instruction": "q", "output": "a"}] * 3))
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "cache")
    ds = DatasetSpec(source=f"{url}/d.json")
    examples, _ = load_examples([ds], "sft", ctx, max_invalid_fraction=0)
    assert len(examples) == 3
    (root / "d.json").unlink()  # served no more: the cached copy is used
    examples, _ = load_examples([ds], "sft", ctx, max_invalid_fraction=0)
    assert len(examples) == 3


def test_http_not_found_names_the_field(http_root, tmp_path):
    _, url = http_root
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError) as err:
        resolve(f"{url}/missing.json", ctx, field="spec.datasets[0].source", kind="dataset")
    assert err.value.field == "spec.datasets[0].source"
    assert "missing.json" in str(err.value)


def test_hf_source_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = RunContext(cache_dir=tmp_path)
    with pytest.raises(SourceError, match="not in the local cache and the Hub cannot be reached"):
        resolve("hf://Qwen/Qwen2.5-0.5B", ctx, field="spec.model.source")


def test_unknown_embedded_model_lists_the_bundled_ones(tmp_path):
    with pytest.raises(SourceError, match="available: embedded://smollm2-135m-instruct"):
        resolve("embedded://gpt-5", RunContext(cache_dir=tmp_path), field="spec.model.source")


def test_embedded_is_for_models_only(tmp_path):
    with pytest.raises(SourceError, match="names a bundled model, not a data set"):
        resolve("embedded://x", RunContext(), field="f", kind="dataset")


def test_local_paths_resolve_against_the_job_directory(tmp_path):
    ctx = RunContext(base_dir=tmp_path, pvc_root=Path("/mnt/pvc"))
    assert resolve("data/x.json", ctx, field="f") == tmp_path / "data" / "x.json"
    assert resolve("/abs/x", ctx, field="f") == Path("/abs/x")
    assert resolve("pvc://models/llama/v1", ctx, field="f") == Path("/mnt/pvc/models/llama/v1")
    assert resolve("file:///tmp/y", ctx, field="f") == Path("/tmp/y")
