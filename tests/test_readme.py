"""The README's Python blocks, run in order in one namespace, as a reader would paste them."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_blocks_that_compile():
    found = blocks()
    assert len(found) >= 6
    for block in found:
        compile(block, "README.md", "exec")


def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks(), 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        finally:
            plt.close("all")
