"""Screenshot MLflow's UI over a tracking store in headless Chromium: what a person sees in `mlflow ui`.

    python scripts/ui_screenshot.py --store mlflow.db compare RUN_ID RUN_ID ... -o compare.png
    python scripts/ui_screenshot.py --store mlflow.db run RUN_ID -o run.png           # its Model metrics tab
    python scripts/ui_screenshot.py --store mlflow.db run RUN_ID --tab overview -o run.png
    python scripts/ui_screenshot.py --store mlflow.db page '#/experiments/1/runs' -o runs.png

It starts its own `mlflow server` on 127.0.0.1 (a free port) over the sqlite file, opens the page in headless
Chromium with every other host unresolvable, waits until the page has drawn (no spinner left, nothing changing),
writes the PNG (and with `--dom FILE` the rendered HTML), and stops both. Chromium is driven over the DevTools
protocol on a pipe: MLflow's UI is a JavaScript app that draws after its API calls answer, and a plain
`chromium --screenshot` shoots whatever is there at a fixed (virtual) time, spinners included. Needs `chromium`
on the PATH (Debian: apt-get install chromium). A failure is one line on stderr and exit 1; the output files
are then left as they were.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SERVER_START_SECONDS = 300  # a busy 2-core machine took 174 s (5 s of CPU) where an idle one takes 10
CALL_SECONDS = 120  # one DevTools command (a screenshot of a large page takes seconds)
# The browser's name for the server (Chromium maps it to 127.0.0.1 below). Not "127.0.0.1" or "localhost": on
# those MLflow 3.17's UI opens its assistant panel over a quarter of the page on a first visit (isLocalServer).
UI_HOST = "mlflow.localhost"


class ShotError(Exception):
    """A failure worth one line to the user."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_experiment(base: str, run_id: str) -> str:
    """The experiment of run `run_id`, asked of the server; a run not in the store is one line."""
    url = f"{base}/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': run_id})}"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return json.load(resp)["run"]["info"]["experiment_id"]
    except urllib.error.HTTPError as err:
        try:
            why = json.loads(err.read()).get("message", "")
        except ValueError:
            why = ""
        raise ShotError(f"MLflow run {run_id!r}: the server answered {err.code} {why}".strip()
                        + "; pass a run id of this store") from None


@contextlib.contextmanager
def mlflow_server(store: Path, log: Path):
    """`mlflow server` on 127.0.0.1 over `store` until the block ends; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store}", "--default-artifact-root", str(store.parent / "mlruns"),
           "--allowed-hosts", f"127.0.0.1:{port},{UI_HOST}:{port}",
           "--cors-allowed-origins", f"http://{UI_HOST}:{port}"]
    with log.open("wb") as out:  # its own session: stopping it stops its gunicorn/uvicorn children too
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, log)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise ShotError(f"mlflow server exited {proc.returncode}: {last}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    raise ShotError(f"mlflow server did not answer {base}/health within {SERVER_START_SECONDS} s; "
                    f"its last line: {last}")


def page_path(base: str, args: argparse.Namespace) -> str:
    """The UI's hash route for the requested page; run ids are checked against the store first."""
    if args.page == "page":
        return args.ids[0]
    experiments = [run_experiment(base, run_id) for run_id in args.ids]
    if args.page == "run":
        return f"#/experiments/{experiments[0]}/runs/{args.ids[0]}/{args.tab}"
    query = f"runs={json.dumps(args.ids)}&experiments={json.dumps(sorted(set(experiments)))}"
    return f"#/compare-runs?{urllib.parse.quote(query, safe='=&')}"


# Ready: the app has drawn (a tab or a heading) and no spinner is left on screen (charts below it wait to be
# scrolled to); then the page must stop changing.
READY_JS = """(() => {
  const seen = e => { const r = e.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight && r.width > 0; };
  const busy = [...document.querySelectorAll('[class*="-spin-spinning"], [class*="skeleton"]')].some(seen);
  const drawn = document.querySelector('[role=tab], h1, h2');
  return drawn && !busy ? document.body.innerHTML.length : -1;
})()"""


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    ended by NUL on fds 3 and 4), so no websocket client is needed; one page target."""

    def __init__(self, path: str, profile: Path, width: int, height: int):
        to_child, self._to_me = os.pipe(), os.pipe()  # (read, write) each

        def fds():  # the child's fd 3 reads our commands, its fd 4 writes its answers
            read, write = os.dup(to_child[0]), os.dup(self._to_me[1])
            os.dup2(read, 3), os.dup2(write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1 , MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
        self.proc = subprocess.Popen([path, *flags, "about:blank"], preexec_fn=fds, pass_fds=(3, 4),
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_child[0]), os.close(self._to_me[1])
        self._out, self._in = os.fdopen(to_child[1], "wb"), self._to_me[0]
        self._id, self.session, self._buf = 0, None, b""
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        self._out.write(json.dumps(message).encode() + b"\0")
        self._out.flush()
        deadline = time.monotonic() + CALL_SECONDS
        while True:  # events and other answers go by until ours
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise ShotError(f"chromium: {method}: {answer['error'].get('message')}")
                    return answer["result"]
            if not select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise ShotError(f"chromium did not answer {method} within {CALL_SECONDS} s")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise ShotError(f"chromium exited (code {self.proc.poll()}) during {method}")
            self._buf += chunk

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(OSError, ShotError):
            self.call("Browser.close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(OSError):  # a pipe to a dead browser
            self._out.close()
        os.close(self._in)


def wait_ready(browser: Browser, url: str, seconds: float) -> None:
    """Until READY_JS gives the same page size twice, a second apart (the charts drew), or `seconds` pass."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        size = browser.evaluate(READY_JS)
        if size is not None and size >= 0 and size == last:
            return
        last = size
        time.sleep(1)
    raise ShotError(f"{url} was still loading after {seconds:.0f} s; raise --wait (a busy machine draws slowly)")


def shoot(args: argparse.Namespace, path: str, work: Path) -> str:
    with mlflow_server(args.store, work / "server.log") as base:
        url = f"{base.replace('127.0.0.1', UI_HOST)}/{page_path(base, args)}"
        browser = Browser(path, work / "profile", args.width, args.height)
        try:
            browser.call("Page.navigate", url=url)
            wait_ready(browser, url, args.wait)
            png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            dom = browser.evaluate("document.documentElement.outerHTML") if args.dom else None
        finally:
            browser.close()
    if not png.startswith(PNG_MAGIC):
        raise ShotError(f"chromium gave no PNG for {url}")
    write_whole(args.output, png)  # whole files only: a failure above leaves the old ones
    if dom is not None:
        write_whole(args.dom, dom.encode())
    return url


def write_whole(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="the tracking store's sqlite file (mlflow.db)")
    parser.add_argument("page", choices=("compare", "run", "page"),
                        help="compare: MLflow's Compare page of the runs; run: one run's page; page: a UI path")
    parser.add_argument("ids", nargs="+", help="run ids (compare: two or more; run: one), or the UI path for page")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--tab", default="model-metrics",
                        choices=("overview", "model-metrics", "system-metrics", "artifacts"), help="run: which tab")
    parser.add_argument("--dom", type=Path, help="also write the rendered page's HTML here")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the page to draw (default 120)")
    args = parser.parse_args(argv)
    if args.page == "run" and len(args.ids) != 1 or args.page == "page" and len(args.ids) != 1:
        parser.error(f"{args.page} takes one {'run id' if args.page == 'run' else 'UI path'}")
    if args.page == "compare" and len(args.ids) < 2:
        parser.error("compare takes two or more run ids")
    if not (200 <= args.width <= 8000 and 200 <= args.height <= 8000 and 1 <= args.wait <= 600):
        parser.error("--width/--height must be 200..8000 and --wait 1..600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        # mlflow would create an empty store at a wrong path and show no runs: refuse instead
        if not args.store.is_file() or args.store.open("rb").read(16) != b"SQLite format 3\x00":
            raise ShotError(f"{args.store}: not an sqlite file; pass the tracking store (e.g. --store mlflow.db)")
        args.store = args.store.resolve()
        browser = next(filter(None, map(shutil.which, BROWSERS)), None)
        if browser is None:
            raise ShotError("no chromium on the PATH; install it (Debian: apt-get install chromium) and rerun")
        with tempfile.TemporaryDirectory(prefix="ui-shot-") as work:
            url = shoot(args, browser, Path(work))
    except (ShotError, OSError) as err:
        print(f"ui_screenshot: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ui_screenshot: interrupted", file=sys.stderr)
        return 130
    print(f"{args.output} <- {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
