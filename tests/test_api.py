"""The README's Python API example runs as written (shortened, into a temporary folder)."""

import re

from safetensors.torch import load_file

from .conftest import REPO


def test_readme_api_example_trains_and_saves(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('"runs/api-refl-red"', repr(str(tmp_path / "api")))
    code = re.sub(r"max_steps=\d+", "max_steps=2", code)
    monkeypatch.chdir(REPO)
    exec(compile(code, "README.md", "exec"), {})
    lora = load_file(tmp_path / "api" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora.up" in k or "lora_B" in k)
