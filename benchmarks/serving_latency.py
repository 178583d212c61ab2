"""Latency of the served model (`mlflow models serve`, the pyfunc of serving.py) per request: p50 and p95 for batches
of 1 and 64 images, without TTA and with `flip_translate` (six views), and the ratio TTA / none.

The net is the default params' (the report's, 15.5 M parameters, 32x32 input) with its initial weights: latency does
not depend on what the weights are. Each variant is logged as the pipeline logs it (tracking.log_served_model) into a
scratch store and served from there on 127.0.0.1; requests are JSON tensors of uint8 pixels, sent one at a time after
3 warm-up requests.

Usage: python benchmarks/serving_latency.py [--requests 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from common import REPO, child_env, cpu_header

sys.path.insert(0, str(REPO / "src"))

BATCHES = (1, 64)


def log_models(store: str) -> dict[str, str]:
    """The default net logged once per TTA mode; {tta: model URI}."""
    import mlflow

    from imgclf.training import families
    from imgclf.config import load_params
    from imgclf.serving.pyfunc import log_served_model

    params = load_params(str(REPO / "params.yaml"), [])
    x = np.zeros((8, 32, 32, 3), np.uint8)
    model = families.REGISTRY.get(params["model"]["arch"]).build(params, 10, x)
    mlflow.set_tracking_uri(store)
    uris = {}
    for tta in ("none", "flip_translate"):
        with mlflow.start_run() as run:
            log_served_model(model, [str(i) for i in range(10)], tta, None)
        uris[tta] = f"runs:/{run.info.run_id}/model"
    return uris


@contextlib.contextmanager
def served(uri: str, store: str, port: int, log: Path):
    bin_dir = Path(sys.executable).parent  # the venv's: mlflow runs its uvicorn from PATH
    env = {**child_env(), "MLFLOW_TRACKING_URI": store, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow models serve exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def latencies(url: str, batch: int, count: int) -> list[float]:
    body = {"inputs": np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3)).tolist()}
    times = []
    for i in range(count + 3):
        start = time.perf_counter()
        response = requests.post(url, json=body, timeout=300)
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {response.text[:500]}")
        if i >= 3:
            times.append(time.perf_counter() - start)
    return times


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    print(cpu_header())
    results = {}
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-serving-") as tmp:
        os.chdir(tmp)  # the scratch store's artifacts stay in it
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for port, (tta, uri) in enumerate(log_models(store).items(), start=5391):
            with served(uri, store, port, Path(tmp) / f"serve-{tta}.log") as url:
                for batch in BATCHES:
                    results[tta, batch] = latencies(url, batch, args.requests)
    print(f"{'tta':<16}{'batch':>6}{'p50 ms':>10}{'p95 ms':>10}{'images/s (p50)':>16}")
    for (tta, batch), times in results.items():
        print(f"{tta:<16}{batch:>6}{p(times, 50):>10.1f}{p(times, 95):>10.1f}{batch / statistics.median(times):>16.0f}")
    for batch in BATCHES:
        ratio = statistics.median(results["flip_translate", batch]) / statistics.median(results["none", batch])
        print(f"batch {batch}: flip_translate / none = {ratio:.2f}x (six views per image)")


if __name__ == "__main__":
    main()
