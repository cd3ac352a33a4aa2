"""Import layering: the API without torch or kopf, the trainer without kopf, the CLI light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("kubetune.api.v1alpha1", ["torch", "kopf", "transformers", "kubetune_trainer",
                                   "kubetune_operator"]),
        ("kubetune.api.crd", ["torch", "kopf", "transformers"]),
        ("kubetune.cli", ["torch", "kopf", "transformers", "trl", "peft"]),
        ("kubetune_trainer.train", ["kopf", "kubetune_operator", "torch"]),
        ("kubetune_trainer.data.loading", ["kopf", "kubetune_operator"]),
    ],
)
def test_import_does_not_pull_in(module, forbidden):
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing {module} imported {out}"


def test_no_top_level_operator_package_shadows_the_stdlib():
    import operator

    assert hasattr(operator, "itemgetter"), operator.__file__


def test_import_layers_hold():
    """The contracts in pyproject.toml ([tool.importlinter]): the operator's layers (no
    circle, no arrow upward), the trainer's data layer below its recipes."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
