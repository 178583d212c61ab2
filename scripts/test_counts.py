"""Count `assert` statements and collected test ids per test file.

Used to show that a change to the suite did not shrink what it checks:
run it before and after and compare the two tables.
    python scripts/test_counts.py > before.txt
"""
import ast
import collections
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"


def assert_counts():
    """`assert` statements per file, by the AST so that comments and strings don't count."""
    counts = {}
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        counts[path.name] = sum(isinstance(node, ast.Assert) for node in ast.walk(tree))
    return counts


def test_id_counts():
    """Collected test ids per file (parametrized cases count one each)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", str(TESTS)],
        capture_output=True, text=True, cwd=TESTS.parent,
    ).stdout
    counts = collections.Counter()
    for line in out.splitlines():
        if "::" in line:
            counts[pathlib.Path(line.split("::")[0]).name] += 1
    return counts


def main():
    asserts, ids = assert_counts(), test_id_counts()
    print(f"{'file':32} {'asserts':>8} {'test ids':>8}")
    for name in sorted(asserts):
        print(f"{name:32} {asserts[name]:>8} {ids.get(name, 0):>8}")
    print(f"{'TOTAL':32} {sum(asserts.values()):>8} {sum(ids.values()):>8}")


if __name__ == "__main__":
    main()
