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


@pytest.fixture
def recording_server(tmp_path):
    """A loopback server that records each request's Authorization header and fails a
    request with the credentials echoed back (as some servers do)."""
    seen: list[str | None] = []
    body = json.dumps([{"instruction": "q", "output": "a"}] * 2).encode()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            if "fail" in self.path:
                self.send_error(403, f"denied {self.path}")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield seen, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_dataset_secret_ref_is_sent_as_a_bearer_token(recording_server, tmp_path, monkeypatch):
    seen, url = recording_server
    monkeypatch.setenv("KUBETUNE_DATASET_0_TOKEN", "s3cr3t")
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "cache")
    ds = DatasetSpec.model_validate({"source": f"{url}/d.json",
                                     "secretRef": {"name": "data-token"}})
    examples, _ = load_examples([ds], "sft", ctx, max_invalid_fraction=0)
    assert len(examples) == 2
    assert seen and set(seen) == {"Bearer s3cr3t"}


def test_hf_token_is_not_sent_to_other_hosts(recording_server, tmp_path, monkeypatch):
    seen, url = recording_server
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    resolve(f"{url}/d.json", RunContext(cache_dir=tmp_path), field="spec.model.source")
    assert seen and set(seen) == {None}


def test_a_token_is_never_sent_over_plain_http_to_another_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_DATASET_0_TOKEN", "s3cr3t")
    with pytest.raises(SourceError, match="only sent over https"):
        resolve("http://data.example.com/d.json", RunContext(cache_dir=tmp_path), field="f",
                kind="dataset", token_env="KUBETUNE_DATASET_0_TOKEN")


def test_credentials_in_urls_are_redacted_in_messages_and_the_cache(recording_server, tmp_path):
    from kubetune_trainer.sources import redact

    seen, url = recording_server
    host = url.removeprefix("http://")
    ctx = RunContext(cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError) as err:
        resolve(f"http://me:hunter2@{host}/fail.json?sig=abc&x=1", ctx, field="f")
    assert "hunter2" not in str(err.value) and "abc" not in str(err.value)
    assert "***" in str(err.value)
    path = resolve(f"{url}/d.json?token=abc", ctx, field="f")
    assert path.name == "d.json" and path.read_bytes().startswith(b"[")
    odd = resolve(f"{url}/?token=abc", ctx, field="f")  # no file name in the path
    assert "abc" not in str(odd) and len(odd.name) == 16
    cached = [str(p) for p in (tmp_path / "cache").rglob("*")]
    assert not any("abc" in p or "token" in p for p in cached), cached
    assert redact("https://u:p@h/x?X-Amz-Signature=1&download=1") == "https://***@h/x?download=1&***"
