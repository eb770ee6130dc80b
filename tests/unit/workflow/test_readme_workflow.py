"""The README's diffusion-workflow example runs as written (quantize with its default dynamic shapes)."""

from __future__ import annotations

import pathlib
import re

from PIL import Image

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def test_readme_workflow_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = text.split("<!-- diffusion-workflow-example -->", 1)[1].split(
        "<!-- end-diffusion-workflow-example -->", 1
    )[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert len(code.strip().splitlines()) < 25
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert len(scope["calib"]) == 4 and (tmp_path / "calib-sd3" / "manifest.json").is_file()
    assert type(scope["pipe"].transformer).__name__ == "QuantizedModel"
    assert Image.open(tmp_path / "fox.png").size == (32, 32)
