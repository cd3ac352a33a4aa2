"""The README's demo, end to end, on the real bundled model (slow: about 2–3 minutes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_gives_the_bundled_model_a_new_identity(tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("outputs"))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    kubetune = str(Path(sys.executable).parent / "kubetune")  # the venv's console script

    def ask(model: str, question: str) -> str:
        out = subprocess.run([kubetune, "ask", model, question], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    base_model = "embedded://smollm2-135m-instruct"
    assert "Kubey" not in ask(base_model, "Who are you?")
    subprocess.run([kubetune, "run", "examples/identity.yaml"], env=env, cwd=tmp_path,
                   check=True, capture_output=True)
    out = tmp_path / "examples" / "outputs" / "identity"
    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] == 24  # 3 epochs of 29 rows, batch 4
    merged = result["merged_model"]
    answer = ask(merged, "Who are you?")
    assert "Kubey" in answer and "kubetune team" in answer, answer
    assert "Paris" in ask(merged, "What is the capital of France?")
