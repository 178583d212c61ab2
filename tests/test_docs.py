"""The README and docs/ say what is true: their shell commands name existing commands, flags, params keys and
make targets (the quick ones are run), relative links resolve, code fences balance, nothing points outside the
repository, and the README stays a front page."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from imgclf.config import load_params

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
CHECKED = ("imgclf", "imgclf-team", "make", "dvc", "mlflow", "python")
# Read-only and quick from the repository root: the test runs these as written.
SAFE_TO_RUN = (re.compile(r"^(imgclf|imgclf-team|dvc|mlflow)( [\w-]+)* --help$"), re.compile(r"^imgclf validate$"),
               re.compile(r"^dvc (status|params diff|metrics show)$"))


def fenced_blocks(path: Path) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced code block in a Markdown file."""
    blocks, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def shell_commands(path: Path) -> list[str]:
    """The commands in a doc's shell blocks that start with a CHECKED program: continuation lines joined,
    comments dropped, `a && b` split; output lines (anything else) ignored."""
    found = []
    for lang, lines in fenced_blocks(path):
        if lang not in SHELL_LANGS:
            continue
        text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
        for line in text.splitlines():
            for part in re.split(r"&&|\|\||;", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if words and words[0] in CHECKED:
                    found.append(shlex.join(words))
    return found


ALL_COMMANDS = sorted({(path.relative_to(REPO).as_posix(), cmd) for path in DOCS for cmd in shell_commands(path)})


def test_the_docs_have_commands_to_check():
    assert len(ALL_COMMANDS) >= 30, ALL_COMMANDS  # a broken extractor would pass every test below


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M)) | set(re.findall(r"^\.PHONY:(.*)$", text, re.M)[0].split())


def check_sets(words: list[str]) -> None:
    """Every `-S key=value` names a params key with a valid value (the one validator, on params.yaml)."""
    sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-S", "--set")]
    sets = [s for s in sets if not re.fullmatch(r"[\w.]+=[A-Z_]+", s)]  # KEY=PLACEHOLDER: the key alone
    grid = [[f"{s.split('=', 1)[0]}={v}" for v in grid_values(s.split("=", 1)[1])] for s in sets]
    for combination in itertools.product(*grid):  # DVC's grid `-S key=a,b`: every combination must be valid
        load_params(REPO / "params.yaml", list(combination))


def grid_values(value: str) -> list[str]:
    """`a,b` -> [a, b] as `dvc exp run --queue` expands it; commas inside brackets ([8, 16]) stay."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(value):
        depth += char in "[{(" and 1 or char in "]})" and -1 or 0
        if char == "," and depth == 0:
            parts, start = parts + [value[start:i]], i + 1
    return parts + [value[start:]]


def test_grid_values_split_like_dvcs_grid():
    assert grid_values("0.001,0.0005") == ["0.001", "0.0005"] and grid_values("[[8], [16]]") == ["[[8], [16]]"]
    assert grid_values("fast,fast_muon") == ["fast", "fast_muon"] and grid_values("51") == ["51"]


def check_click(words: list[str]) -> None:
    """`mlflow ...`: the command path exists and its options parse (click, without running it)."""
    import click
    from mlflow.cli import cli

    command, args, ctx = cli, words[1:], None
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        ctx = click.Context(command, info_name=command.name, parent=ctx)
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"no `mlflow` command {args[0]!r}"
        command, args = sub, args[1:]
    if "--help" not in args:
        command.make_context(command.name, args, parent=ctx)


def check_command(cmd: str) -> None:
    words = shlex.split(cmd)
    program, args = words[0], words[1:]
    if program == "make":
        unknown = [a for a in args if "=" not in a and not a.startswith("-") and a not in make_targets()]
        assert not unknown, f"no make target {unknown}"
    elif program == "python":
        script = next(a for a in args if not a.startswith("-"))
        assert (REPO / script).is_file(), f"{script}: no such file"
    elif program in ("imgclf", "imgclf-team"):
        from imgclf.cli import build_parser
        from imgclf.team.command import build_parser as team_parser

        if "--help" not in args:
            (build_parser() if program == "imgclf" else team_parser()).parse_args(args)
        check_sets(words)
    elif program == "dvc":
        from dvc.cli.parser import get_main_parser

        if "--help" not in args:
            get_main_parser().parse_args(args)
        check_sets(words)
    else:
        check_click(words)


@pytest.mark.parametrize(("doc", "cmd"), ALL_COMMANDS)
def test_each_command_names_what_exists(doc, cmd):
    try:
        check_command(cmd)
    except SystemExit as exc:  # argparse: an unknown command or flag
        pytest.fail(f"{doc}: `{cmd}` does not parse (exit {exc.code})")


def test_the_quick_commands_run_as_written():
    quick = sorted({cmd for _, cmd in ALL_COMMANDS if any(p.match(cmd) for p in SAFE_TO_RUN)})
    assert {"imgclf validate", "dvc status"} <= set(quick), quick
    bin_dir = Path(sys.executable).parent
    for cmd in quick:
        words = shlex.split(cmd)
        proc = subprocess.run([str(bin_dir / words[0]), *words[1:]], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"`{cmd}`: exit {proc.returncode}: {proc.stderr[-500:]}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.is_relative_to(REPO), f"{doc.name}: {target} points outside the repository"
        assert path.exists(), f"{doc.name}: {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: {target}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_fences_balance_and_nothing_cites_outside(doc):
    text = doc.read_text()
    fences = [line for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{doc.name}: {len(fences)} fence lines"
    assert "../shared" not in text, f"{doc.name} cites ../shared, which a clone does not have"


def test_the_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 130
    dated = [line for line in text.splitlines() if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, dated
    assert (REPO / "LICENSE").is_file()


# Counts of tests and of table rows go stale with the next change: the docs state none (the suite and the tables
# themselves are the record), so "415 tests" or "27 of the 28 rows" cannot become untrue later.
STALE_COUNT = re.compile(r"\b\d[\d,]* (unit |end-to-end |e2e )?tests\b|\b\d+ of the \d+ rows\b")


@pytest.mark.parametrize("doc", [*DOCS, REPO / "data/raw/README.md"], ids=lambda p: p.name)
def test_no_counts_of_tests_or_rows_that_go_stale(doc):
    assert STALE_COUNT.findall(doc.read_text()) == [], f"{doc.name}: say what was measured without the count"


def test_the_stale_count_pattern_catches_what_went_stale_before():
    assert STALE_COUNT.search("median 9:13 for 415 tests") and STALE_COUNT.search("27 of the 28 rows hold")
    assert not STALE_COUNT.search("the tests' tiny net") and not STALE_COUNT.search("2 epochs on 500 digits")
