"""The README as a newcomer follows it (#43): its command blocks, pasted in order into one new bash session in a
fresh clone, each line run as written but for the few substitutions below, named with their reasons; any line
that exits non-zero (a "command not found" is 127) fails the test. Besides: the results table's commands train
what their rows say, and a team server on every interface answers the name it tells members to use."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, REPO, TINY, copy_repo, free_port, pipeline_env, reaped, run, write_params
from test_docs import fenced_blocks

README = REPO / "README.md"
PASTED_LANGS = {"", "sh", "bash", "shell"}  # ```text blocks are output, not pasted
# The fast family at the tests' size (tests/conftest.py FAST_TINY): appended to the README's preset commands, whose
# preset would otherwise train its own 8 to 10 epochs of a 64-256-256 net. `-S` values other than params.yaml's
# shipped ones win over a preset's, in `imgclf experiments` (they come last) and in `dvc exp run` alike.
FAST_TINY_SETS = ["-S", "model.fast.widths=[8, 16, 16]", "-S", "model.fast.whiten_images=40", "-S",
                  "train.batch_size=16", "-S", "train.training_epochs=2"]
PASTE_SECONDS = 900  # 140 s here beside other work (load ~2 on 2 cores); the rest is room for a loaded machine
# Lines of the README not run, each with its reason (a short, explicit list: anything else runs).
NOT_RUN = {
    r"^make test\b": "the whole suite, of which this test is a part",
}


def pasted_lines(readme: Path = README) -> list[str]:
    """The lines of the README's command blocks, in order, blank ones dropped."""
    return [line for lang, lines in fenced_blocks(readme) if lang in PASTED_LANGS for line in lines if line.strip()]


class Paste:
    """The script one bash session reads: each README line, rewritten where the test must (SUBSTITUTIONS), with
    a check after it that stops at the first non-zero status and names the line."""

    def __init__(self, work: Path, source: Path, venv: Path):
        self.work, self.source, self.venv, self.port = work, source, venv, free_port()
        self.lines = [
            "set +e",  # a person's shell: a failing line does not end it; the check after each line does
            "__check() { if [ \"$2\" -eq 0 ]; then echo \"@@ ok: $1\" \"(at $SECONDS s)\";"
            " else echo \"@@ failed (exit $2): $1\"; exit 3; fi; }",
            # A newcomer's PATH has none of the commands: the README's own activate line must bring them.
            "for c in imgclf dvc mlflow; do ! command -v $c >/dev/null || { echo \"@@ $c found before activate\";"
            " exit 4; }; done",
        ]

    def add(self, readme_line: str) -> None:
        for pattern in NOT_RUN:
            if re.search(pattern, readme_line):
                return
        for pattern, rewrite in SUBSTITUTIONS:
            if re.search(pattern, readme_line):
                steps = rewrite(self, readme_line)
                break
        else:
            steps = [readme_line]
        for step in steps:
            self.lines += [step, f"__check {shlex.quote(readme_line)} $?"]


def clone(paste: Paste, line: str) -> list[str]:
    """The README's placeholder URL -> the committed copy of this working tree. No network here, so make's setup
    (pip from PyPI, then the clone's package, editable) is stood in for: a .venv that lends this environment's bin/
    under a fresh stamp, and PYTHONPATH on the clone's src/, so that the clone's own code runs as after `make setup`
    (not this working tree's, which others may be editing meanwhile). `make run` then runs its pipeline as written."""
    assert line.startswith("git clone REPO_URL imgclf && cd imgclf"), line
    return [f"git clone -q {shlex.quote(str(paste.source))} imgclf && cd imgclf",
            f"mkdir .venv && ln -s {shlex.quote(str(paste.venv / 'bin'))} .venv/bin && touch .venv/.installed"
            ' && export PYTHONPATH="$PWD/src"']


def tiny_preset(paste: Paste, line: str) -> list[str]:
    """A preset run, at the tests' size (FAST_TINY_SETS after the README's own -S; the comment stays last)."""
    command, _, comment = line.partition("#")
    return [f"{command.rstrip()} {shlex.join(FAST_TINY_SETS)}" + (f"  #{comment}" if comment else "")]


def with_run_id(paste: Paste, line: str) -> list[str]:
    """RUN_ID: the id from reports/run.json, one of the places the README names."""
    return ["RUN_ID=$(python -c 'import json; print(json.load(open(\"reports/run.json\"))[\"mlflow_run_id\"])')",
            line.replace("RUN_ID", '"$RUN_ID"')]


def background(probe: str):
    """A server the README starts in the foreground: here in the background, on a free port (5000 and 5002 may be
    taken on a shared machine), until `probe` (PROBES) answered from 127.0.0.1; then stopped."""
    def rewrite(paste: Paste, line: str) -> list[str]:
        command = re.sub(r"\s--port \d+", "", line.partition("#")[0]).rstrip()
        return [f"{command} --port {paste.port} > {shlex.quote(str(paste.work / probe))}.log 2>&1 & SERVER=$!",
                f"python {shlex.quote(str(paste.work / 'probe.py'))} {probe} {paste.port}; PROBED=$?; "
                f"kill $SERVER; wait $SERVER 2>/dev/null; (exit $PROBED)"]
    return rewrite


def own_images(paste: Paste, line: str) -> list[str]:
    """`dvc add data/raw/pets`: first the newcomer's photos, one folder per class, as the README describes."""
    return [f"cp -r {shlex.quote(str(paste.work / 'pets'))} data/raw/pets", line]


def photos(paste: Paste, line: str) -> list[str]:
    """`imgclf predict photos/`: a folder of the newcomer's photos."""
    return [f"cp -r {shlex.quote(str(paste.work / 'photos'))} photos", line]


def local_remote(paste: Paste, line: str) -> list[str]:
    """The team's SSH remote -> a folder here (tests/test_team.py pushes and pulls over a real sshd)."""
    return [re.sub(r"ssh://\S+", shlex.quote(str(paste.work / "remote")), line)]


SUBSTITUTIONS = [
    (r"^git clone ", clone),
    (r"-S preset=|imgclf experiments --variants", tiny_preset),
    (r"^imgclf (rerun|promote) RUN_ID", with_run_id),
    (r"^mlflow ui\b", background("ui")),
    (r"^mlflow models serve\b", background("serve")),
    (r"^imgclf predict photos/", photos),
    (r"^dvc add data/raw/pets\b", own_images),
    (r"^dvc remote add .*ssh://", local_remote),
]

# Run from the clone with its .venv active: fails (exit 1) unless the server answers what the README promises.
PROBE = textwrap.dedent("""
    import json, sys, time, urllib.request
    what, port = sys.argv[1], sys.argv[2]
    base = f"http://127.0.0.1:{port}"
    deadline, last = time.monotonic() + 150, None
    while time.monotonic() < deadline:
        try:
            if what == "ui":  # the clone's ./mlflow.db: the imgclf experiment and make run's run in it
                url = base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=imgclf"
                experiment = json.load(urllib.request.urlopen(url, timeout=5))["experiment"]
                body = json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode()
                request = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", body,
                                                 {"Content-Type": "application/json"})
                runs = json.load(urllib.request.urlopen(request, timeout=5)).get("runs", [])
                sys.exit(0 if runs else "mlflow ui: no runs in the imgclf experiment")
            urllib.request.urlopen(base + "/ping", timeout=5)  # the champion model, loaded
            sys.exit(0)
        except OSError as exc:
            last = exc
            time.sleep(1)
    sys.exit(f"{what} on port {port}: no answer in 150 s ({last})")
""")


def write_images(folder: Path, count: int, seed: int) -> None:
    """`count` random 48x48 RGB PNGs in `folder`: what the pipeline reads is a real image file, the content is noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i:03}.png")


def paste_into_a_new_shell(tmp_path: Path, readme: Path) -> tuple[subprocess.CompletedProcess, Paste]:
    """Paste `readme`'s command blocks into one new bash session in `tmp_path` (the clone: `tmp_path`/imgclf)."""
    # The repository as the clone gets it: this working tree, committed, with the tests' tiny training settings in
    # params.yaml, so `make run`, `imgclf rerun` and the rest train 2 epochs of a small net on 200 digits.
    source = copy_repo(tmp_path / "source")
    write_params(source, TINY)
    run(["git", "commit", "-qam", "tiny settings for the paste test"], source)
    for name, seed in (("cat", 1), ("dog", 2)):
        write_images(tmp_path / "pets/train" / name, 24, seed)
    write_images(tmp_path / "photos", 2, 3)
    (tmp_path / "probe.py").write_text(PROBE)
    paste = Paste(tmp_path, source, BIN.parent)
    for line in pasted_lines(readme):
        paste.add(line)
    # A new shell: no virtual environment, no tracking URI, nothing of this interpreter's bin/ on PATH.
    env = {k: v for k, v in pipeline_env().items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    with reaped(tmp_path):
        try:
            proc = subprocess.run(["bash", "--noprofile", "--norc"], input="\n".join(paste.lines) + "\n",
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PASTE_SECONDS)
        except subprocess.TimeoutExpired as exc:  # its output so far says which line it was on
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            pytest.fail(f"the paste ran past {PASTE_SECONDS} s; its last steps:\n{out[-3000:]}")
    return proc, paste


def report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.mark.e2e
@pytest.mark.long(150)
@pytest.mark.xdist_group("readme-paste")
def test_the_readmes_commands_run_as_pasted_in_a_fresh_clone(tmp_path):
    proc, paste = paste_into_a_new_shell(tmp_path, README)
    assert proc.returncode == 0, report(proc)
    checks = sum(line.startswith("__check ") for line in paste.lines)
    assert proc.stdout.count("@@ ok: ") == checks, report(proc)  # every step ran, none ended the shell early
    clone = tmp_path / "imgclf"
    assert (clone / "preds.csv").read_text().count("\n") >= 3, report(proc)  # a header and a row per photo
    assert (clone / "data/raw/pets.dvc").is_file() and any((tmp_path / "remote").rglob("*")), report(proc)
    assert "MATCH" in proc.stdout, report(proc)  # `imgclf rerun` of make run's run: the same weights


@pytest.mark.e2e
@pytest.mark.xdist_group("readme-paste")
@pytest.mark.parametrize(("lines", "failed"), [
    (["imgclf validate"], "@@ failed (exit 127): imgclf validate"),  # no activate line: command not found
    (["source .venv/bin/activate", "dvc status", "imgclf -S no.such.key=1 validate"],
     "@@ failed (exit 2): imgclf -S no.such.key=1 validate"),
])
def test_a_readme_line_not_found_or_failing_fails_the_paste(tmp_path, lines, failed):
    readme = tmp_path / "README.md"
    readme.write_text("```\ngit clone REPO_URL imgclf && cd imgclf\n" + "\n".join(lines) + "\n```\n")
    proc, _ = paste_into_a_new_shell(tmp_path, readme)
    assert proc.returncode == 3 and proc.stdout.rstrip().splitlines()[-1] == failed, report(proc)


def test_the_paste_covers_every_readme_command_line():
    """Each pasted line is run, rewritten by a named substitution, or in NOT_RUN: none silently dropped, and every
    substitution and exclusion still matches a README line (a stale one would hide a changed command)."""
    lines = pasted_lines()
    assert len(lines) >= 8, lines
    for pattern in [*NOT_RUN, *(p for p, _ in SUBSTITUTIONS)]:
        assert any(re.search(pattern, line) for line in lines), f"{pattern!r} matches no README command line"
    paste = Paste(Path("/w"), Path("/s"), Path("/v"))
    for line in lines:
        paste.add(line)
    checked = [line for line in paste.lines if line.startswith("__check ")]
    run_or_rewritten = {shlex.split(line)[1] for line in checked}
    skipped = {line for line in lines if any(re.search(p, line) for p in NOT_RUN)}
    assert run_or_rewritten | skipped == set(lines) and not run_or_rewritten & skipped


# --- the results table: each row's command trains what the row says ------------------------------------------


def result_rows() -> list[tuple[str, str]]:
    """(command, the row's other cells) of the README's results table: the first column's code."""
    text = README.read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return [(re.match(r"\| `([^`]+)`", row).group(1), row.split("|", 2)[2]) for row in rows]


def as_dvc_writes_them(sets: list[str]) -> dict:
    """The params a stage loads after `dvc exp run -S ...`: DVC writes each -S into params.yaml (the last of a key
    wins), the stage reads the file back, and the preset then fills in the keys still at their shipped value."""
    import yaml
    from imgclf.config import apply_overrides, load_params, parse_yaml

    written = apply_overrides(parse_yaml((REPO / "params.yaml").read_text()), sets)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"readme-row-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False))
    try:
        return load_params(path)
    finally:
        path.unlink()


def trained_params(command: str) -> list[dict]:
    """The params each run of `command` trains with: `make run` reads params.yaml; `dvc exp run -S ...` as DVC
    writes them (so a key set to its shipped value cannot win over a preset there); `imgclf experiments` queues
    one `dvc exp run -S ...` per (variant, seed)."""
    from imgclf.cli import build_parser
    from imgclf.config import load_params
    from imgclf.experiments.command import queue_args

    words = shlex.split(command)
    if words == ["make", "run"]:
        return [load_params(REPO / "params.yaml")]
    if words[:3] == ["dvc", "exp", "run"]:
        return [as_dvc_writes_them([w for flag, w in zip(words, words[1:]) if flag in ("-S", "--set")])]
    assert words[0] == "imgclf", f"{command}: a results command of a kind this test cannot read"
    args = build_parser().parse_args(words[1:])
    assert args.command == "experiments", command
    found = []
    for variant in args.variants:
        for seed in args.seeds:
            queued = queue_args(variant, seed, args.overrides + args.sub_overrides)
            found.append(as_dvc_writes_them(queued[queued.index("--queue") + 2::2]))  # its -S values, in order
    return found


@pytest.mark.parametrize(("command", "cells"), result_rows(), ids=[c for c, _ in result_rows()])
def test_each_results_row_names_a_command_that_trains_what_the_row_says(command, cells):
    for params in trained_params(command):
        precision = params["train"]["mixed_precision"]
        if "bfloat16" in cells:
            assert precision in ("auto", "mixed_bfloat16"), f"{command}: trains {precision}, the row says bfloat16"
        if "float32" in cells:
            assert precision == "none", f"{command}: trains {precision}, the row says float32"
        assert params["data"]["dataset"] == ("cifar10" if "CIFAR-10" in cells or "the same" in cells else "digits")
        preset = re.search(r"`(fast|fast_muon)` preset", cells)
        assert params["model"]["arch"] == ("fast" if preset else "report"), command
        if preset:
            assert params["model"]["fast"]["optimizer"] == ("muon" if preset.group(1) == "fast_muon" else "nesterov")
        epochs = re.search(r"(\d+) epochs", cells)
        assert not epochs or params["train"]["training_epochs"] == int(epochs.group(1)), command


def test_the_results_table_has_its_rows():
    assert len(result_rows()) >= 4 and result_rows()[0][0] == "make run"


# --- the team lines: a server on every interface answers the name it hands out ----------------------------------


def test_a_team_server_on_every_interface_answers_by_name_and_its_ui_may_write():
    """`make team-server TEAM_HOST=0.0.0.0` prints `http://NAME:PORT`: MLflow's own checks (Host header against
    DNS rebinding, the Origin of the UI's writes) must pass that name, and still refuse others."""
    from mlflow.server.security_utils import is_allowed_host_header, should_block_cors_request

    from imgclf.team.mlflow_server import public_uri, reach_by_name

    uri = public_uri("0.0.0.0", 5000)
    name = uri.split("//", 1)[1]
    args = reach_by_name("0.0.0.0", 5000, [])
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    origins = args[args.index("--cors-allowed-origins") + 1].split(",")
    for host in (name, "127.0.0.1:5000", "localhost:5000", "10.0.0.7:5000"):
        assert is_allowed_host_header(hosts, host), host
    assert not is_allowed_host_header(hosts, "attacker.example:5000")
    assert not should_block_cors_request(uri, "POST", origins)
    assert should_block_cors_request("http://attacker.example", "POST", origins)
    assert reach_by_name("127.0.0.1", 5000, []) == []  # the default: nothing to add
    mine = reach_by_name("0.0.0.0", 5000, ["--allowed-hosts", "mlflow.lab.example"])
    assert "--allowed-hosts" not in mine and "--cors-allowed-origins" in mine  # the user's own list wins
