"""The CPU a command's start costs on each Python 3.11 build here: the one `make setup` makes .venv from
(Debian's /usr/bin/python3.11 where there is one) against the first python3.11 on PATH (pyenv's here).

Most of an `imgclf train` or `evaluate` process is its start: importing TensorFlow, Keras, MLflow and
scikit-learn, which is Python code running, so the interpreter's build shows in every command and in every
end-to-end test. Each interpreter imports what `imgclf train` and `imgclf evaluate` import, from this
.venv's packages, in a fresh process, alternately; medians of user+system CPU seconds and their ratio.

Usage: python benchmarks/interpreter.py [--repeats 7] [--python PATH ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sysconfig

from common import REPO, child_env, child_usage, cpu_header, verdict

TARGET = 0.95  # the chosen interpreter must start commands at least 5 % cheaper to be worth a second Python
IMPORTS = "import imgclf.train, imgclf.evaluate, imgclf.tracking.tracker"


def candidates() -> list[str]:
    """The first python3.11 on PATH outside .venv (the baseline), then Debian's, when they differ."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(REPO / ".venv")))
    found = [shutil.which("python3.11", path=path), "/usr/bin/python3.11"]
    return list(dict.fromkeys(real_executable(p) for p in found if p and os.path.exists(p)))


def real_executable(python: str) -> str:
    """The interpreter itself, not a pyenv shim (a shell script that would add its own start to each timing)."""
    return subprocess.run([python, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                          check=True).stdout.strip()


def start_cpu(python: str) -> float:
    """User+system CPU seconds of one fresh `python` importing IMPORTS from this .venv's site-packages."""
    site_packages = sysconfig.get_paths()["purelib"]
    # -S and addsitedir: this .venv's packages only, not the interpreter's own site-packages
    code = f"import site; site.addsitedir({site_packages!r}); {IMPORTS}"
    usage = child_usage([python, "-S", "-c", code], {**child_env(), "PYTHONNOUSERSITE": "1"},
                        f"{python} could not import imgclf from {site_packages}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--python", nargs="+", help="interpreters to compare, the first one the baseline")
    args = parser.parse_args()
    pythons = args.python or candidates()
    for python in pythons:
        if not shutil.which(python):
            raise SystemExit(f"--python {python}: no such executable; give the path of a python3.11")
    if len(pythons) < 2:
        raise SystemExit(f"only one Python 3.11 here ({pythons}): nothing to compare")
    print(cpu_header())
    times: dict[str, list[float]] = {p: [] for p in pythons}
    for i in range(args.repeats):
        for python in pythons:
            times[python].append(start_cpu(python))
        print(f"run {i + 1}: " + ", ".join(f"{p} {t[-1]:.2f} s" for p, t in times.items()), flush=True)
    base = statistics.median(times[pythons[0]])
    print(f"\nCPU seconds to import {IMPORTS!r}, {args.repeats} fresh processes each (medians)")
    for python in pythons:
        median = statistics.median(times[python])
        line = f"{python}: {median:.2f} s   ratio to {pythons[0]} {median / base:.2f}"
        print(line if python == pythons[0] else f"{line}   {verdict(median / base, TARGET, higher_is_better=False)}")


if __name__ == "__main__":
    main()
