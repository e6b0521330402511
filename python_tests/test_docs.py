"""The documentation's code samples, run as written (README.md and docs/*.md).

The convention (CONTRIBUTING.md, "Documentation samples"):
- A page's ```python blocks, and its ```bash blocks in which every command is a `moa` command,
  are its samples. They run in page order, in one fresh working folder per page; the python
  blocks share one namespace, so a later block may use what an earlier one made.
- `moa` runs as `python -m moa_engine.cli` of this checkout.
- `<!-- doc-test: slow -->` anywhere in a page marks its test slow.
- Every other block is not run here: ```text, ```cpp, ```cmake, and shell blocks with other
  commands (installs, CMake builds, benchmark runs). The ```cpp blocks that hold a whole
  program (`int main`) are compile-checked against the public headers instead.

A sample fails its page's test when it raises or, for a shell block, exits non-zero.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Every markdown file whose links are checked.
LINKED = PAGES + [
    ROOT / "CONTRIBUTING.md",
    ROOT / "CHANGELOG.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "benchmarks" / "results").glob("*.md")),
]
SLOW_MARK = "<!-- doc-test: slow -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the block's first code line in its page

    @property
    def is_moa_shell(self) -> bool:
        """A bash block whose every command is a `moa` command."""
        if self.lang != "bash":
            return False
        commands = [c for c in _shell_commands(self.code)]
        return bool(commands) and all(c.startswith("moa ") for c in commands)


def _shell_commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines left out."""
    joined, current = [], ""
    for raw in code.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append((current + line).strip())
        current = ""
    if current:
        joined.append(current.strip())
    return joined


def blocks_of(text: str) -> list[Block]:
    """Every fenced block of a markdown text, in order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m["lang"]:
            i += 1
            continue
        indent, start, body = m["indent"], i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        if i >= len(lines):
            raise ValueError(f"line {start}: a ```{m['lang']} block is never closed")
        out.append(Block(m["lang"], "\n".join(body) + "\n", start + 1))
        i += 1
    return out


def samples_of(text: str) -> list[Block]:
    return [b for b in blocks_of(text) if b.lang == "python" or b.is_moa_shell]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_samples(page_name: str, text: str, workdir: Path) -> None:
    """Runs a page's samples in order in `workdir`; raises on the first that fails, naming it."""
    namespace = {"__name__": "__doc_sample__"}
    old_cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for block in samples_of(text):
            if block.lang == "python":
                code = compile("\n" * (block.line - 1) + block.code, page_name, "exec")
                exec(code, namespace)  # a traceback names the page and line
            else:
                script = 'set -euo pipefail\nmoa() { "$MOA_DOCS_PYTHON" -m moa_engine.cli "$@"; }\n' + block.code
                env = {**_env(), "MOA_DOCS_PYTHON": sys.executable}
                r = subprocess.run(
                    ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=1800
                )
                sys.stdout.write(r.stdout)
                if r.returncode != 0:
                    raise AssertionError(
                        f"{page_name}:{block.line}: the shell sample exited with {r.returncode}\n"
                        f"{block.code}\n--- stdout (end) ---\n{r.stdout[-3000:]}\n--- stderr (end) ---\n{r.stderr[-3000:]}"
                    )
    finally:
        os.chdir(old_cwd)
        namespace.clear()
        gc.collect()


def _page_param(page: Path):
    text = page.read_text(encoding="utf-8")
    marks = [pytest.mark.slow] if SLOW_MARK in text else []
    return pytest.param(page, marks=marks, id=str(page.relative_to(ROOT)))


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_page_samples_run(page, tmp_path):
    text = page.read_text(encoding="utf-8")
    if not samples_of(text):
        pytest.skip("no runnable samples on this page")
    run_samples(str(page.relative_to(ROOT)), text, tmp_path)


# ---------------------------------------------------------------------------------------------
# The harness itself, and the pages' structure
# ---------------------------------------------------------------------------------------------


def test_a_failing_sample_fails_the_page(tmp_path):
    good = "```python\nx = 2\n```\n"
    run_samples("good.md", good + "```python\nassert x == 2\n```\n", tmp_path)
    with pytest.raises(ZeroDivisionError):
        run_samples("bad.md", good + "text\n\n```python\ny = x / 0\n```\n", tmp_path)
    with pytest.raises(AssertionError, match="bad-shell.md:2"):
        run_samples("bad-shell.md", "```bash\nmoa no-such-command\n```\n", tmp_path)


def test_which_blocks_are_samples():
    text = (
        "```bash\nmoa generate 'x'  # a comment\nmoa convert \\\n  --force\n```\n"
        "```bash\npip install x && moa generate y\n```\n"
        "```text\nmoa generate z\n```\n"
        "  ```python\n  a = 1\n  ```\n"
    )
    blocks = blocks_of(text)
    assert [b.lang for b in blocks] == ["bash", "bash", "text", "python"]
    assert [b.is_moa_shell for b in blocks] == [True, False, False, False]
    assert blocks[3].code == "a = 1\n" and blocks[3].line == 13
    assert _shell_commands(blocks[0].code) == ["moa generate 'x'  # a comment", "moa convert  --force"]


def test_readme_marked_commands_are_fenced_bash_blocks():
    """CI (.ci/run) runs the fenced block right after each marker with awk."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for marker, must in (("<!-- main-command -->", "moa generate"), ("<!-- test-command -->", "pytest python_tests")):
        assert lines.count(marker) == 1, marker
        i = lines.index(marker)
        assert lines[i + 1] == "```bash" and lines[i + 3] == "```", (
            f"{marker} must be followed by a one-line bash block"
        )
        assert must in lines[i + 2]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _prose(text: str) -> str:
    """The text without its fenced blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return "\n".join(out)


def _anchors(path: Path) -> set[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = _prose(page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # an outside address
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


# ---------------------------------------------------------------------------------------------
# C++ samples: whole programs compile against the public headers
# ---------------------------------------------------------------------------------------------


def _cpp_programs():
    for page in PAGES:
        for block in blocks_of(page.read_text(encoding="utf-8")):
            if block.lang == "cpp" and "int main" in block.code:
                yield pytest.param(block, id=f"{page.relative_to(ROOT)}:{block.line}")


@pytest.mark.slow
@pytest.mark.parametrize("block", list(_cpp_programs()))
def test_cpp_program_samples_compile(block, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    source = tmp_path / "sample.cpp"
    source.write_text(block.code)
    includes = [f"-I{p}" for p in [ROOT / "csrc" / "include", *include_paths()]]
    r = subprocess.run(
        [compiler, "-std=c++20", "-fsyntax-only", "-w", *includes, str(source)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
