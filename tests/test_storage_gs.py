"""gs:// outputs against gcp-storage-emulator (PyPI), started here: the probe, a checkpoint
uploaded with its marker last, restored into a fresh staging directory and accepted by the
resume check, final outputs uploaded. Without credentials (the emulator has none): gcsfs
finds it through STORAGE_EMULATOR_HOST."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import OutputError
from kubetune_trainer.outputs import Layout
from kubetune_trainer.progress import COMPLETE_MARKER, file_manifest, find_resume
from kubetune_trainer.storage import Store

BUCKET = "kubetune-gs"


@pytest.fixture(scope="module")
def gcs():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    if not exe.exists():
        pytest.skip("gcp-storage-emulator is not installed (dev extra)")
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory", "--default-bucket", BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mp = pytest.MonkeyPatch()
    mp.setenv("STORAGE_EMULATOR_HOST", url)
    # gcsfs' zonal/HNS probe speaks gRPC to the bucket, which the emulator does not.
    mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=10)


def _store(uri: str) -> Store:
    return Store.for_output(FineTuneJobSpec.model_validate({
        "model": {"source": "m"}, "datasets": [{"source": "d.json"}], "output": {"uri": uri}}))


def test_checkpoint_round_trip_through_gcs(gcs, tmp_path):
    store = _store(f"gs://{BUCKET}/jobs/g")
    assert "writable" in store.check()
    pod1 = Layout(tmp_path / "pod1")
    ckpt = pod1.checkpoints / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(os.urandom(3000))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (ckpt / COMPLETE_MARKER).write_text(json.dumps({"step": 3, "files": file_manifest(ckpt)}))
    pod1.progress.write_text('{"step": 3}\n')
    store.upload_checkpoint(pod1, 3)
    assert store.checkpoints() == [(3, "checkpoint-3")]

    pod2 = Layout(tmp_path / "pod2")
    pod2.root.mkdir()
    store.restore(pod2, log=lambda *_: None)
    assert (pod2.checkpoints / "checkpoint-3" / "trainer_state.json").read_text() == \
        json.dumps({"global_step": 3})
    assert pod2.progress.read_text() == '{"step": 3}\n'
    assert find_resume(pod2.checkpoints).path == pod2.checkpoints / "checkpoint-3", \
        "the downloaded files match the marker's sizes and hashes"

    (pod1.root / "adapter").mkdir()
    (pod1.root / "adapter" / "adapter_config.json").write_text("{}")
    pod1.result.write_text("{}")
    uris = store.upload_outputs(pod1, ["adapter", "result.json", "loss.png"])
    assert uris == {"adapter": f"gs://{BUCKET}/jobs/g/adapter",
                    "result.json": f"gs://{BUCKET}/jobs/g/result.json"}
    assert store.fs.cat_file(f"{BUCKET}/jobs/g/adapter/adapter_config.json") == b"{}"


def test_a_missing_gcs_bucket_is_named(gcs):
    with pytest.raises(OutputError) as err:
        _store("gs://no-such-bucket/x").check()
    assert err.value.field == "spec.output.uri"
    assert "bucket 'no-such-bucket' does not exist" in err.value.message
