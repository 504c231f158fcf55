"""The README's Python examples run, in order, under the suite's strict promotion."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 3


def test_readme_examples_run():
    namespace: dict = {"__name__": "readme"}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "python -m optax_snr.demo" in text
    assert 'pip install -e ".[test]" && python -m pytest' in text
