"""Every ```python example of the README runs (on the tiny checkpoint instead of the embedded model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_examples():
    assert BLOCKS and any("load_model" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[i].replace('"smollm2-135m-instruct"', repr(tiny_ckpt))
    namespace: dict = {}
    exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own README


def test_readme_is_a_user_guide():
    """At most 300 lines; measurements live in docs/results/, and the README links every file there."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    for word in ("issue ", "acceptance", "this session", "TODO"):
        assert word not in text, word
    results = README.parent / "docs" / "results"
    assert {"headline.md", "em.md"} <= {f.name for f in results.glob("*.md")}  # shipped, not git-ignored
    for f in sorted(results.glob("*.md")):
        assert f"docs/results/{f.name}" in text, f.name


def test_no_merge_conflict_markers_in_the_tree():
    root = README.parent
    marks = ("<" * 7 + " ", ">" * 7 + " ")
    files = [root / "README.md", root / "Makefile", *root.glob("docs/**/*.md"), *root.glob("harmprune/**/*.py"),
             *root.glob("harmprune/**/*.md"), *root.glob("tests/*.py"), *root.glob("scripts/*.py")]
    bad = [f"{f.relative_to(root)}:{i}" for f in files for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
           if line.startswith(marks)]
    assert not bad, bad
