"""A data set reads only inside its folder: dataset_info.json entries, directories, links,
and pvc:// paths stay inside their root, or are refused naming the entry (here and in the pod,
which runs the same loader)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.errors import KubetuneError
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.loading import load_examples

ROWS = [{"instruction": "q", "output": "a"}] * 2


def _load(spec: dict, ctx: RunContext):
    return load_examples([DatasetSpec.model_validate(spec)], "sft", ctx,
                         max_invalid_fraction=1.0)


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside" / "x.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps(ROWS))
    return secret


def test_a_registry_file_name_outside_its_folder_is_refused_naming_the_entry(tmp_path, outside):
    data = tmp_path / "job" / "data"
    data.mkdir(parents=True)
    (data / "dataset_info.json").write_text(json.dumps(
        {"evil": {"file_name": "../../outside/x.json"}}))
    with pytest.raises(KubetuneError, match="evil: .*outside the data folder"):
        _load({"source": "data/dataset_info.json", "entries": ["evil"]},
              RunContext(base_dir=tmp_path / "job"))


@pytest.mark.parametrize("target", ["/etc/passwd", "outside"])
def test_a_link_out_of_a_data_directory_is_refused(tmp_path, outside, target):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.json").write_text(json.dumps(ROWS))
    os.symlink(target if target.startswith("/") else outside, data / "leak.txt")
    with pytest.raises(KubetuneError, match="leak.txt is outside the data folder"):
        load_examples([DatasetSpec(source="data")], "pt", RunContext(base_dir=tmp_path),
                      max_invalid_fraction=1.0)


def test_a_registry_entry_whose_folder_links_out_is_refused(tmp_path, outside):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(outside.parent, data / "sub")
    (data / "dataset_info.json").write_text(json.dumps({"e": {"file_name": "sub/x.json"}}))
    with pytest.raises(KubetuneError, match="e: sub/x.json is outside"):
        _load({"source": "data/dataset_info.json", "entries": ["e"]},
              RunContext(base_dir=tmp_path))


def test_a_pvc_path_out_of_its_claim_is_refused(tmp_path, outside):
    claims = tmp_path / "claims"
    (claims / "data").mkdir(parents=True)
    os.symlink(outside, claims / "data" / "link.json")
    for source in ("pvc://data/link.json", "pvc://data/../../outside/x.json"):
        with pytest.raises(KubetuneError, match="outside the claim data"):
            _load({"source": source, "format": "alpaca"}, RunContext(pvc_root=claims))


def test_links_inside_the_folder_are_read(tmp_path):
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    (data / "real" / "a.json").write_text(json.dumps(ROWS))
    os.symlink(data / "real" / "a.json", data / "b.json")
    (data / "dataset_info.json").write_text(json.dumps({"e": {"file_name": "b.json"}}))
    examples, _ = _load({"source": "data/dataset_info.json", "entries": ["e"]},
                        RunContext(base_dir=tmp_path))
    assert len(examples) == 2


# Paths a dataset_info.json may name: the ones that climb out must be refused, the others read.
_SEGMENTS = st.lists(st.sampled_from(["..", ".", "d", "x.json", "", "out"]), min_size=1,
                     max_size=5)


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_SEGMENTS)
def test_fuzz_registry_file_names_never_leave_the_folder(tmp_path, parts):
    root = tmp_path / "case"
    data = root / "a" / "data"
    (data / "d").mkdir(parents=True, exist_ok=True)
    (data / "d" / "x.json").write_text(json.dumps(ROWS))
    (root / "a" / "x.json").write_text(json.dumps(ROWS))
    (data / "x.json").write_text(json.dumps(ROWS))
    name = "/".join(parts)
    (data / "dataset_info.json").write_text(json.dumps({"e": {"file_name": name or "."}}))
    inside = os.path.normpath(os.path.join(str(data), name)).startswith(str(data))
    try:
        _load({"source": str(data / "dataset_info.json"), "entries": ["e"]}, RunContext())
    except KubetuneError as err:
        assert inside or "outside the data folder" in str(err), (name, err)
    else:
        assert inside, name


def test_a_loop_of_links_is_refused_naming_it(tmp_path):
    """Found by the path fuzz (test_fuzz_data): a link to itself was a RuntimeError."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.json").write_text(json.dumps(ROWS))
    os.symlink("l.json", data / "l.json")
    with pytest.raises(KubetuneError, match="l.json is a loop of links"):
        load_examples([DatasetSpec(source="data")], "sft", RunContext(base_dir=tmp_path),
                      max_invalid_fraction=1.0)
    (tmp_path / "claims" / "c").mkdir(parents=True)
    os.symlink("x.json", tmp_path / "claims" / "c" / "x.json")
    with pytest.raises(KubetuneError, match="a loop of links on the claim c"):
        _load({"source": "pvc://c/x.json", "format": "alpaca"},
              RunContext(pvc_root=tmp_path / "claims"))
