"""Prepared sft data is cached by content hash: a second run (or rank) does not tokenize."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_spec
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError
from kubetune_trainer.config import RunContext
from kubetune_trainer.data import cache, preprocess
from kubetune_trainer.recipes import recipe
from kubetune_trainer.train import prepare_data

ROWS = [{"instruction": f"Say {i}.", "output": f"{i} it is."} for i in range(40)]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def counted(monkeypatch):
    """How many times the real tokenizing ran."""
    calls = []
    real = preprocess.tokenize_to_files

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess, "tokenize_to_files", counting)
    return calls


def _spec(tiny_model, tmp_path, **training):
    return FineTuneJobSpec.model_validate(tiny_spec(
        tiny_model, [{"source": str(tmp_path / "d.json")}], tmp_path / "out",
        training={"packing": True, "evalSplit": 0.1, **training}))


def _prepare(spec, tmp_path, tok, lines=None):
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "cache")
    return prepare_data(spec, ctx, tok, recipe(spec.stage),
                        log=(lines.append if lines is not None else lambda *_: None))


def test_second_run_loads_the_prepared_rows_instead_of_tokenizing(tiny_model, tmp_path, tok,
                                                                 counted):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    spec = _spec(tiny_model, tmp_path)
    first_log, second_log = [], []
    first = _prepare(spec, tmp_path, tok, first_log)
    second = _prepare(spec, tmp_path, tok, second_log)
    assert len(counted) == 1
    assert first.stats["cached"] is False and second.stats["cached"] is True
    assert first.train[:] == second.train[:] and first.eval[:] == second.eval[:]
    assert second.eval_examples == first.eval_examples and second.template == first.template
    assert second_log[:-1] == first_log  # the same report, then where it came from
    assert second_log[-1].startswith("data: prepared rows loaded from the cache")


@pytest.mark.parametrize("change", ["data", "cutoff", "masking", "packing"])
def test_what_the_rows_depend_on_is_in_the_key(tiny_model, tmp_path, tok, counted, change):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    _prepare(_spec(tiny_model, tmp_path), tmp_path, tok)
    training = {"cutoff": {"cutoffLen": 64}, "masking": {"trainOnPrompt": True},
                "packing": {"packing": False}}.get(change, {})
    if change == "data":
        (tmp_path / "d.json").write_text(json.dumps(ROWS[:-1]))
    again = _prepare(_spec(tiny_model, tmp_path, **training), tmp_path, tok)
    assert len(counted) == 2 and again.stats["cached"] is False


def test_concurrent_ranks_prepare_once(tiny_model, tmp_path, tok, counted):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    spec = _spec(tiny_model, tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_prepare(spec, tmp_path, tok)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counted) == 1
    assert sorted(r.stats["cached"] for r in results) == [False, True, True]
    assert all(r.train[:] == results[0].train[:] for r in results)


def test_held_out_data_sets_are_in_the_key(tiny_model, tmp_path, tok, counted):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "e.json").write_text(json.dumps(ROWS[:5]))
    spec = FineTuneJobSpec.model_validate(tiny_spec(
        tiny_model, [{"source": str(tmp_path / "d.json")}], tmp_path / "out",
        evalDatasets=[{"source": str(tmp_path / "e.json")}]))
    first = _prepare(spec, tmp_path, tok)
    (tmp_path / "e.json").write_text(json.dumps(ROWS[5:12]))
    again = _prepare(spec, tmp_path, tok)
    assert again.stats["cached"] is False and len(again.eval) == 7 and len(first.eval) == 5
    assert _prepare(spec, tmp_path, tok).stats["cached"] is True


def _entry(cache_dir, digest: str, size: int, used: float) -> None:
    entry = cache_dir / "prepared" / digest[:32]
    entry.mkdir(parents=True)
    (entry / "train.arrow").write_bytes(b"x" * size)
    (entry / "meta.json").write_text("{}")
    os.utime(entry / "meta.json", (used, used))


def test_a_full_cache_loses_its_least_recently_used_entries_first(tmp_path):
    for digest, used in (("a" * 64, 100), ("b" * 64, 300), ("c" * 64, 200), ("d" * 64, 50)):
        _entry(tmp_path, digest, 1000, used)
    ctx = RunContext(cache_dir=tmp_path)
    held = cache._hold(cache._dir(ctx, "a" * 64), fcntl.LOCK_SH)  # a run reads it
    # 4,000 bytes, 2,500 allowed: d (the current entry, however old) and a (in use) stay.
    assert cache.prune(ctx, "d" * 64, 2500) == ["c" * 32, "b" * 32]
    held.close()
    assert cache.prune(ctx, "d" * 64, 2500) == []  # a and d fit
    assert cache.prune(ctx, "d" * 64, 0) == ["a" * 32]
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir() if p.is_dir()) == ["d" * 32]


def test_what_a_stopped_run_half_built_goes_and_a_build_in_progress_stays(tmp_path):
    ctx = RunContext(cache_dir=tmp_path)
    _entry(tmp_path, "d" * 64, 10, 50)
    for digest in ("e" * 64, "f" * 64):
        (cache._dir(ctx, digest).with_name(digest[:32] + ".tmp-4242") / "part").mkdir(
            parents=True)
    with cache.lock(ctx, "f" * 64):  # f's build is running (in another process, say)
        assert cache.prune(ctx, "d" * 64, 2**30) == ["e" * 32 + ".tmp-4242"]
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir() if p.is_dir()) == [
        "d" * 32, "f" * 32 + ".tmp-4242"]


def test_a_shared_directory_this_pod_cannot_write_falls_back_to_its_own_cache(
        tiny_model, tmp_path, tok, capfd):
    (tmp_path / "claim").write_text("")  # not a directory: nothing can be made under it
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "own",
                     prepared_dir=tmp_path / "claim" / "prepared")
    assert cache.shared_dir(ctx) is None
    assert "is not writable here" in capfd.readouterr().err
    spec = _spec(tiny_model, tmp_path)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    data = prepare_data(spec, ctx, tok, recipe("sft"), log=lambda _: None)
    assert data.stats["cached"] is False and len(data.train) > 0
    assert any((tmp_path / "own" / "prepared").iterdir())  # the pod's own cache has them


def test_a_killed_runs_scratch_goes_and_a_live_or_new_one_stays(tmp_path):
    ctx = RunContext(cache_dir=tmp_path)
    _entry(tmp_path, "d" * 64, 10, 50)
    live = cache.scratch(ctx)  # this run's, held
    new, dead = (tmp_path / "prepared" / f"{cache.SCRATCH}{n}" for n in ("new", "dead"))
    for d in (new, dead):
        (d / "rows").mkdir(parents=True)
    old = time.time() - 2 * cache.SCRATCH_GRACE_SECONDS
    for d in (dead, Path(live.name)):
        os.utime(d, (old, old))
    assert cache.prune(ctx, "d" * 64, 2**30) == [dead.name]
    assert Path(live.name).is_dir() and new.is_dir()
    name = live.name
    live.cleanup()
    del live
    assert not Path(name).exists()


def test_a_run_over_the_limit_keeps_the_entries_runs_still_read(tiny_model, tmp_path, tok,
                                                               counted, monkeypatch):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    reading = _prepare(_spec(tiny_model, tmp_path, cutoffLen=64), tmp_path, tok)
    _prepare(_spec(tiny_model, tmp_path, cutoffLen=96), tmp_path, tok)  # let go
    gc.collect()
    monkeypatch.setenv(cache.LIMIT_ENV, "0")
    lines = []
    _prepare(_spec(tiny_model, tmp_path, cutoffLen=128), tmp_path, tok, lines)
    assert lines[-1].startswith("data: 1 least recently used prepared data sets removed")
    assert len(reading.train[:]["input_ids"]) > 0  # its files are still there
    monkeypatch.delenv(cache.LIMIT_ENV)
    assert _prepare(_spec(tiny_model, tmp_path, cutoffLen=64), tmp_path, tok).stats["cached"]
    assert not _prepare(_spec(tiny_model, tmp_path, cutoffLen=96), tmp_path, tok).stats["cached"]
    assert len(counted) == 4  # 64, 96, 128, and 96 again


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_bad_cache_limit_is_refused_before_any_work(tiny_model, tmp_path, tok, counted,
                                                      monkeypatch, value):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    monkeypatch.setenv(cache.LIMIT_ENV, value)
    with pytest.raises(KubetuneError, match=f"{cache.LIMIT_ENV}: '{value}' is not a size"):
        _prepare(_spec(tiny_model, tmp_path), tmp_path, tok)
    assert counted == []
