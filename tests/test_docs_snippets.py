"""Every ```python block in README.md and docs/ runs as printed, on tiny models.

The rule for whoever writes a page:

* The python blocks of one page run in order, in one namespace, as if a reader pasted them
  one after the other into a Python session.  So a page's first block builds what the later
  ones use (a tiny model built from a config: nothing is downloaded), visibly, in the page.
  Each page runs in a fresh empty working directory (files a block writes land there), with
  ``torch.manual_seed(0)`` set first, on one CPU thread.
* A block that cannot run in one CPU process (it needs ``torchrun``, a GPU, ...) has the
  line ``<!-- snippet: REASON -->`` right above its fence, REASON saying what it needs
  (never empty; GitHub does not render the comment).  Such a block is only compiled, and
  every name it reads must be bound: by the block itself, by an earlier block of the page,
  or as a builtin.  Every other block must run without an exception.

A marker that is not directly above a python block fails too, so none lingers after its
block is gone.  Test ids are ``PAGE:LINE`` of the opening fence; a failing block's traceback
points at the page's own lines.

Also checked here, because they are statements the pages make: the README's sample output
has the lines bench/pretrain.py prints; the guide's table of ``--model`` shapes is
bench/common.py's ``MODEL_SHAPES``; and each public optimizer class's docstring (what
``help()`` shows first) carries its update rule, every constructor keyword and its page
under docs/methods/.
"""
from __future__ import annotations

import builtins
import contextlib
import importlib.util
import io
import re
import symtable
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lowrank_optim import factory
from lowrank_optim.optim import OPTIMIZERS
from lowrank_optim.projectors import base as projector_base

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
MARKER = re.compile(r"^\s*<!--\s*snippet:(?P<reason>.*?)-->\s*$")
PYTHON = {"python", "py", "python3"}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    source: str  # the code, dedented, preceded by blank lines so that its line numbers are the page's
    not_run: str | None  # the marker's reason, or None: the block runs

    @property
    def id(self) -> str:
        return f"{relative(self.page)}:{self.line}"


@dataclass(frozen=True)
class Marker:
    page: Path
    line: int
    reason: str
    attached: bool  # directly above a python block


def parse(page: Path) -> tuple[list[Block], list[Marker]]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, markers, attached = [], [], set()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        end = next(
            (j for j in range(index + 1, len(lines)) if lines[j].strip().startswith(fence[0] * len(fence))), len(lines)
        )
        if opening["info"].lower() in PYTHON:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[index + 1:end]]
            above = index - 1
            marker = MARKER.match(lines[above]) if above >= 0 else None
            if marker:
                attached.add(above)
            source = "\n" * (index + 1) + "\n".join(body) + "\n"
            blocks.append(Block(page, index + 1, source, marker["reason"].strip() if marker else None))
        index = end + 1
    for number, line in enumerate(lines):
        match = MARKER.match(line)
        if match:
            markers.append(Marker(page, number + 1, match["reason"].strip(), number in attached))
    return blocks, markers


PARSED = {page: parse(page) for page in PAGES}
BLOCKS = [block for blocks, _ in PARSED.values() for block in blocks]
MARKERS = [marker for _, markers in PARSED.values() for marker in markers]


def unbound_names(block: Block, known: set[str]) -> set[str]:
    """Names ``block`` reads that it does not bind, that are not in ``known`` and are no
    builtins: at module level, and the globals its functions, classes and lambdas read."""
    top = symtable.symtable(block.source, block.id, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    read: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for symbol in table.get_symbols():
            if symbol.is_referenced() and (table is top or symbol.is_global()):
                read.add(symbol.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return read - bound - known - set(dir(builtins))


def bound_names(block: Block) -> set[str]:
    top = symtable.symtable(block.source, block.id, "exec")
    return {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}


class PageRun:
    """The blocks of one page, run in order in one namespace; each block at most once."""

    def __init__(self, page: Path, workdir: Path):
        self.page, self.workdir = page, workdir
        self.namespace: dict = {"__name__": "__main__"}
        self.static: set[str] = set()  # names bound by blocks that are only compiled
        self.next = 0
        self.failed: str | None = None

    def run_through(self, block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
        blocks = PARSED[self.page][0]
        target = blocks.index(block)
        if target < self.next:
            pytest.fail(f"{block.id} already ran: pytest ran the page's blocks out of order")
        monkeypatch.chdir(self.workdir)
        while self.next <= target:
            current = blocks[self.next]
            if self.failed:
                pytest.fail(f"{self.failed} failed, so the later blocks of {relative(self.page)} cannot run")
            self.next += 1
            try:
                self.run_one(current)
            except BaseException:
                self.failed = current.id
                raise

    def run_one(self, block: Block) -> None:
        if self.next == 1:
            torch.manual_seed(0)
        code = compile(block.source, str(block.page), "exec")  # a SyntaxError fails here
        missing = unbound_names(block, set(self.namespace) | self.static)
        assert not missing, f"{block.id} reads names that nothing on the page defines: {sorted(missing)}"
        if block.not_run is not None:
            self.static |= bound_names(block)
            return
        exec(code, self.namespace)  # noqa: S102 (running the page is the test)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread beats two on a shared machine, where idle-spinning
    threads of a busy pool cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory):
    """One :class:`PageRun` per page; the projectors a page registers are unregistered after."""
    registry = dict(projector_base.REGISTRY)
    runs: dict[Path, PageRun] = {}

    def get(page: Path) -> PageRun:
        if page not in runs:
            runs[page] = PageRun(page, tmp_path_factory.mktemp(page.stem))
        return runs[page]

    yield get
    projector_base.REGISTRY.clear()
    projector_base.REGISTRY.update(registry)


# ----------------------------------------------------------------------------- the snippets
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_snippet_runs(block, page_runs, monkeypatch):
    page_runs(block.page).run_through(block, monkeypatch)


def test_the_pages_have_snippets_and_few_are_not_run():
    """Guards the extraction itself: the pages do hold python blocks (an indented one
    included), and only a few are compiled without running."""
    pages = {relative(block.page) for block in BLOCKS}
    assert {"README.md", "docs/guide.md", "docs/distributed.md"} <= pages
    assert len(BLOCKS) >= 15
    fence_lines = [block.page.read_text(encoding="utf-8").splitlines()[block.line - 1] for block in BLOCKS]
    assert any(line.startswith(" ") for line in fence_lines)  # a block inside a list item
    not_run = [block.id for block in BLOCKS if block.not_run is not None]
    assert len(not_run) <= 5, not_run


@pytest.mark.parametrize("marker", MARKERS, ids=[f"{relative(m.page)}:{m.line}" for m in MARKERS])
def test_markers_sit_on_a_python_block_and_give_a_reason(marker):
    where = f"{relative(marker.page)}:{marker.line}"
    assert marker.attached, f"{where}: a snippet marker must be the line right above a ```python fence"
    assert marker.reason, f"{where}: the snippet marker gives no reason"


def test_the_rule_catches_what_it_guards(tmp_path, monkeypatch):
    """A block that raises fails, at the page's line; a marked block is not run, but its
    unbound names are caught; a stray marker and an empty reason are found."""
    page = tmp_path / "page.md"
    lines = [
        "# Page", "", "```python", "x = 1", "```", "",  # 3: runs
        "<!-- snippet: needs torchrun -->", "```python", "raise SystemExit(x + y)", "```", "",  # 8: compiled only
        "<!-- snippet: -->", "", "text", "",  # 12: a stray marker, and no reason
        "  ```python", "  assert x == 2", "  ```",  # 16: indented, inside a list item
    ]
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    blocks, markers = parse(page)
    assert [(b.line, b.not_run) for b in blocks] == [(3, None), (8, "needs torchrun"), (16, None)]
    assert [(m.line, m.reason, m.attached) for m in markers] == [(7, "needs torchrun", True), (12, "", False)]
    assert unbound_names(blocks[1], {"x"}) == {"y"}
    assert unbound_names(blocks[2], {"x"}) == set()
    run = PageRun(page, tmp_path)
    PARSED[page] = (blocks, markers)
    try:
        run.run_through(blocks[0], monkeypatch)
        assert run.namespace["x"] == 1
        with pytest.raises(AssertionError, match=r"\['y'\]"):
            run.run_through(blocks[1], monkeypatch)
        with pytest.raises(pytest.fail.Exception, match="page.md:8 failed"):
            run.run_through(blocks[2], monkeypatch)  # the page stops at its first failure
        run = PageRun(page, tmp_path)
        run.namespace.update(x=1, y=2)
        run.run_one(blocks[1])  # compiled, names all bound: not run, so no SystemExit
        run = PageRun(page, tmp_path)
        run.run_one(blocks[0])
        with pytest.raises(AssertionError) as failure:
            run.run_one(blocks[2])
        assert failure.traceback[-1].lineno + 1 == 17  # the page's line of the assert
    finally:
        del PARSED[page]


# ----------------------------------------------------------------------------- pages vs the script
def load_pretrain():
    spec = importlib.util.spec_from_file_location("bench_pretrain_for_docs", ROOT / "bench" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    module = load_pretrain()
    yield module
    sys.modules.pop("bench_pretrain_for_docs", None)


NUMBER = re.compile(r"\d[\d,.]*(e[-+]?\d+)?")


def masked(line: str) -> str:
    """The line with every number replaced by N and runs of spaces by one."""
    return re.sub(r" +", " ", NUMBER.sub("N", line)).strip()


def test_readme_sample_output_has_the_lines_the_script_prints(pretrain, monkeypatch, tmp_path):
    """The README shows the main job's output; a short run of the same script prints the
    same lines, numbers aside (the projection line and the table's header exactly)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split("What the main job prints", 1)[1]
    sample = re.search(r"\n```\n(.*?)\n```", after, re.DOTALL).group(1).splitlines()
    monkeypatch.setattr(factory, "_announced", set())  # print the projection line again in this process
    monkeypatch.chdir(tmp_path)
    short = ["--quick", "--steps", "2", "--batch-size", "2", "--eval-batches", "1", "--threads", "1"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain.main([*short, "--no-progress"])
    printed = out.getvalue().splitlines()
    assert len(sample) == len(printed), (sample, printed)
    assert sample[1] == printed[1] and sample[1].startswith("lowrank_optim: projecting")
    assert sample[2:4] == printed[2:4]  # the table's header and rule
    for shown, real in zip(sample, printed, strict=True):
        assert masked(shown) == masked(real)


def test_guide_lists_the_model_shapes_of_the_script(pretrain):
    common = importlib.import_module("common")  # bench/common.py: loading the script put bench/ on the path
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    section = guide.split("## The pretraining script", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|((?: \d+ \|)+)", section, re.MULTILINE)
    shapes = {name: tuple(int(cell) for cell in cells.split("|") if cell.strip()) for name, cells in rows}
    assert shapes == {name: tuple(shape) for name, shape in common.MODEL_SHAPES.items()}


# ----------------------------------------------------------------------------- help(OptimizerClass)
CLASSES = sorted(set(OPTIMIZERS.values()), key=lambda cls: cls.__name__)
ENTRY = re.compile(r"^(?P<indent> *)(?P<names>[\w`]+(?:, [\w`]+)*):(?: |$)")


def documented_keywords(doc: str) -> set[str]:
    """The names of the entries of the docstring's ``Args:`` section: lines indented one
    level below the header whose text up to the first colon is a comma-separated list of
    names (``lr, betas: ...``)."""
    lines = doc.expandtabs().splitlines()
    header = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    assert header is not None, "no 'Args:' section"
    level = len(lines[header]) - len(lines[header].lstrip()) + 4
    names: set[str] = set()
    for line in lines[header + 1:]:
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent < level:
            break
        match = ENTRY.match(line)
        if match and indent == level:
            names |= {name.strip("`") for name in match["names"].split(", ")}
    return names


@pytest.mark.parametrize("cls", CLASSES, ids=[cls.__name__ for cls in CLASSES])
def test_class_docstring_has_the_rule_every_keyword_and_its_page(cls):
    doc = vars(cls).get("__doc__") or ""
    assert doc.strip(), f"{cls.__name__} has no docstring of its own"
    assert "Update rule" in doc and "←" in doc, f"{cls.__name__}: the docstring does not give the update rule"
    keywords = set(cls.hyperparameter_defaults())
    documented = documented_keywords(doc)
    assert keywords - documented == set(), f"{cls.__name__}: keywords missing from 'Args:'"
    assert documented - keywords - {"params"} == set(), f"{cls.__name__}: 'Args:' names keywords the class lacks"
    pages = re.findall(r"docs/methods/(\w+)\.md", doc)
    assert pages, f"{cls.__name__}: the docstring names no docs/methods page"
    for page in pages:
        text = (ROOT / "docs" / "methods" / f"{page}.md").read_text(encoding="utf-8")
        assert f"`{cls.__name__}`" in text, f"docs/methods/{page}.md does not mention {cls.__name__}"


def test_the_keyword_parser_reads_continuations_and_groups():
    doc = """Summary.

    Args:
        params: the parameters.
        lr, ``betas``: as AdamW; a long
            description: with a colon in its continuation.
        rank: r.

    Not an entry: here.
    """
    assert documented_keywords(doc) == {"params", "lr", "betas", "rank"}
