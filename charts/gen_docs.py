"""Write charts/kubetune/README.md's values table from values.yaml's `# --` comments.

    python charts/gen_docs.py        (make chart)

The same convention as helm-docs (`# -- description` above a key); a test fails when the
README and values.yaml drift apart.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "kubetune"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"


def rows(values_text: str) -> list[tuple[str, str, str]]:
    """(key path, default as JSON, description) for every documented key, in file order."""
    values = yaml.safe_load(values_text)
    out, stack, pending = [], [], []
    for line in values_text.splitlines():
        m = re.match(r"^(\s*)# ?(-- )?(.*)$", line)
        if m:
            if m.group(2) or pending:
                pending.append(m.group(3).strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        if pending:
            node = values
            for key in stack:
                node = node[key]
            out.append((".".join(stack), json.dumps(node), " ".join(pending)))
            pending = []
    return out


def table(values_text: str) -> str:
    lines = ["| Key | Default | Description |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {desc} |" for k, d, desc in rows(values_text)]
    return "\n".join(lines)


def render(readme: str, values_text: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table(values_text)}\n{END}{tail}"


def main() -> int:
    readme = CHART / "README.md"
    readme.write_text(render(readme.read_text(), (CHART / "values.yaml").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
