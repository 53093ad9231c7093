"""The README's functional-API example runs as written and prints what the README says."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example_blocks():
    text = README.read_text()
    # Blocks preceded by the marker comment are executed; others are shell commands or excerpts.
    return re.findall(r"<!-- runs-in-tests -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_a_runnable_example():
    assert len(_example_blocks()) >= 1


def test_readme_examples_run(capsys):
    for block in _example_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "per-example loss: (8,)" in out
    assert "sample mean 0.298 (data 0.3), std 0.505 (data 0.5)" in out
    assert "heun: 35 NFE, mean 0.30, std 0.53" in out and "dpm_solver_pp: 20 NFE, mean 0.30, std 0.51" in out
    assert "log p: ODE -0.377, closed form -0.377" in out
