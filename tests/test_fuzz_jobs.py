"""Fuzzing job files (seeded, bounded): the loader never crashes or hangs, the CLI and the API
server give every document the same verdict, and whatever both accept renders into objects a
real API server takes, with no credential in the clear.

`make test` runs a few hundred cases per layer; `make fuzz` sets KUBETUNE_FUZZ_EXAMPLES higher.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time

import pytest
import yaml
from conftest import CONFORMANCE
from fuzz_jobs import (
    PLANTED,
    Server,
    hostile_files,
    mutated_jobs,
    planted_jobs,
    render_problems,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.crd import finetunejob_crd
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job, parse_job
from kubetune_operator import builders
from kubetune_operator.backends import children
from kubetune_operator.validation import validate as cluster_validate

EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SERVER = Server(finetunejob_crd())
CONFIG = builders.OperatorConfig(trainer_image="registry.example/trainer:1",
                                 progress_url="https://kubetune.kubetune-system.svc:8443/v1",
                                 progress_ca_configmap="kubetune-ca", default_queue="shared")


def _python_verdict(doc) -> str | None:
    try:
        parse_job(doc)
    except KubetuneError as err:
        assert str(err).strip(), "an empty message"
        return str(err)
    return None


# ------------------------------------------------------------------------ loader


@pytest.mark.parametrize("name", sorted(hostile_files()))
def test_fuzz_loader_refuses_hostile_files_fast_with_a_message(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(hostile_files()[name])
    start = time.monotonic()
    try:
        load_job(path)
    except KubetuneError as err:
        assert str(path) in str(err) or "spec" in str(err) or "metadata" in str(err), err
    assert time.monotonic() - start < 2, f"{name} took {time.monotonic() - start:.1f}s"


_VALID_TEXT = yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                              "metadata": {"name": "x"},
                              "spec": {"model": {"source": "hf://a/b"},
                                       "datasets": [{"source": "d.json", "columns": {"a": "b"}}],
                                       "output": {"uri": "out"}}}).encode()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_VALID_TEXT)),
                          st.sampled_from([b"&a ", b"*a", b"<<: ", b"[", b"{", b"\xff", b"\x00",
                                           b"\t", b"\n  ", b": ", b"- ", b"!!python/object ",
                                           b"'", b'"', b"%YAML 1.2\n", b"---\n", b"\xc3"])),
                min_size=1, max_size=6))
def test_fuzz_loader_mutated_bytes_give_a_job_or_a_message(tmp_path_factory, edits):
    data = bytearray(_VALID_TEXT)
    for at, chunk in sorted(edits, reverse=True):
        data[at:at] = chunk
    path = tmp_path_factory.mktemp("bytes") / "job.yaml"
    path.write_bytes(bytes(data))
    with contextlib.suppress(KubetuneError):
        load_job(path)


# ------------------------------------------------------------------------ parity


@FUZZ
@given(mutated_jobs(SERVER.spec_schema))
def test_fuzz_models_and_crd_give_the_same_verdict(doc):
    ours = _python_verdict(doc)
    server = SERVER.verdict(doc["spec"])
    assert (ours is None) == (server is None), (
        f"kubetune: {ours or 'accepted'}\nAPI server: {server or 'accepted'}\nspec: {doc['spec']}")


# ------------------------------------------------------------------------ render


def _pytorchjob_schema():
    from test_builders import PYTORCHJOB_CRD, _strict

    if not PYTORCHJOB_CRD.exists():
        return None
    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    return _strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


PYTORCHJOB_SCHEMA = _pytorchjob_schema()


RENDERED: list[int] = []


@FUZZ
@given(doc=mutated_jobs(SERVER.spec_schema, valid=True))
def test_fuzz_render_prints_only_what_a_cluster_accepts(doc):
    if PYTORCHJOB_SCHEMA is None:
        pytest.skip(f"the PyTorchJob CRD is not under {CONFORMANCE} (set KUBETUNE_CONFORMANCE)")
    if _python_verdict(doc) is not None:
        return
    job, problem = cluster_validate(doc)
    if problem:
        return
    objs = children(job=job, config=CONFIG, uid="u-1",
                    labels={"kueue.x-k8s.io/queue-name": "team-a"})
    problems = render_problems(objs, PYTORCHJOB_SCHEMA)
    assert not problems, f"{problems}\nspec: {doc['spec']}"
    RENDERED.append(1)


def test_fuzz_render_covered_enough_jobs():
    # Runs after the render fuzz (file order): most mutations keep a job valid.
    if RENDERED:
        assert len(RENDERED) >= EXAMPLES // 5, len(RENDERED)


# ------------------------------------------------------------------------ planted credentials

PLANTED_SEEN: list[str] = []


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 20))
@given(doc=planted_jobs(SERVER.spec_schema))
def test_fuzz_a_planted_credential_never_leaves_the_spec(doc):
    """A credential put where one rides (URL fields: user-info, query or fragment parameters
    of any name, percent-encoded or not; images; env names and values; serve.args) is refused
    by kubetune and the API server alike, and no message of ours (the CLI's, the operator's)
    and no rendered object carries it."""
    import json

    out = []
    ours = _python_verdict(copy.deepcopy(doc))
    if ours is not None:
        out.append(ours)
        # (the API server's own message quotes a value its schema refuses: not ours to print)
        server = SERVER.verdict(copy.deepcopy(doc["spec"]))
        assert server is not None, f"the API server takes what kubetune refused: {ours}"
    job, problem = cluster_validate(copy.deepcopy(doc))
    if problem:
        out.append(problem)
    else:
        out.append(json.dumps(children(job=job, config=CONFIG, uid="u-1")))
    for text in out:
        assert PLANTED not in text and PLANTED.lower() not in text.lower(), text
        assert PLANTED.replace("t", "%74") not in text, text
    PLANTED_SEEN.append("refused" if ours else "rendered")


def test_fuzz_planted_credentials_were_refused():
    # Runs after the fuzz above (file order): a planted credential is refused, not rendered.
    if PLANTED_SEEN:
        assert PLANTED_SEEN.count("refused") >= len(PLANTED_SEEN) * 0.9, PLANTED_SEEN
