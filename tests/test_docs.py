"""The documented examples that run offline on the shipped demo model run exactly as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / markdown).read_text(), flags=re.S)


@pytest.mark.parametrize(("markdown", "marker", "printed"), [
    ("README.md", "DEMO_MODEL_PATH", "is there a blue square ? -> no"),
    ("docs/pruning.md", "last_positions", "267 43 224"),
])
def test_demo_examples_run_as_written(markdown, marker, printed, capsys):
    (block,) = [b for b in python_blocks(markdown) if marker in b]
    exec(compile(block, markdown, "exec"), {"__name__": "__doc_example__"})
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(printed)
