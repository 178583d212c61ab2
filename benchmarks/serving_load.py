"""The served model under load, good and hostile requests mixed: concurrent clients for a fixed time against a real
`mlflow models serve --env-manager local` on 127.0.0.1. Every good answer must be correct (the class and
probability computed here, in-process, from the same net under the same TTA), every hostile request a 400 with one
line; it prints the p50/p99 latency of each kind, the answers per second, and the server's peak RSS under load (all
its processes, sampled) against a stated bound: at most BOUND_MIB above its RSS after warm-up with good requests,
which one 35 Mpx decode (~175 MB, what a 4 KB PNG could ask for before the request limits) would nearly use up alone.

The net is the default params' (the report's, 15.5 M parameters, 32x32) with its initial weights, logged as train
logs it (tracking.log_served_model): latency does not depend on what the weights are.

Usage: python benchmarks/serving_load.py [--seconds 25] [--clients 4] [--hostile 0.5] [--tta none]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from common import REPO, cpu_header, verdict
from serving_latency import p, served

sys.path.insert(0, str(REPO / "src"))

BOUND_MIB = 256  # peak RSS over the warm server's, all processes of the server together


def png(size: tuple[int, int], seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def body(form: str, items: list) -> bytes:
    if form in ("inputs", "instances"):
        return json.dumps({form: items}).encode()
    if form == "dataframe_split":
        return json.dumps({form: {"columns": ["image"], "data": [[item] for item in items]}}).encode()
    return json.dumps({form: [{"image": item} for item in items]}).encode()


def good_requests(model, tta: str) -> list[tuple[bytes, list[str], list[float]]]:
    """(body, classes, probabilities) per good request: tensors and encoded images of assorted sizes, each form."""
    from imgclf.data.images import decode_image
    from imgclf.tta import probabilities

    cases = []
    for i, form in enumerate(("inputs", "instances", "dataframe_split", "dataframe_records")):
        files = [png((20 + 13 * j, 48 - 5 * j), 10 * i + j, ("PNG", "JPEG", "BMP", "GIF")[j % 4]) for j in range(4)]
        pixels = np.stack([decode_image(f, Path("x"), 32) for f in files])
        cases.append((body(form, [base64.b64encode(f).decode() for f in files]), pixels))
        if form in ("inputs", "instances"):  # tensors: a batch of 1 and one of 8
            tensor = np.random.default_rng(i).integers(0, 256, (1 + 7 * i, 32, 32, 3), dtype=np.uint8)
            cases.append((json.dumps({form: tensor.tolist()}).encode(), tensor))
    answers = []
    for data, pixels in cases:
        probs = probabilities(model, pixels, tta)
        answers.append((data, [str(k) for k in probs.argmax(1)], probs.max(1).tolist()))
    return answers


def hostile_requests() -> list[bytes]:
    """What a hostile client sends: each is a 400 with one line (none may cost the server much)."""
    nan = np.full((1, 32, 32, 3), 255.0)
    nan[0, 5, 5, 1] = np.nan
    bomb = io.BytesIO()
    Image.new("L", (7000, 5000)).save(bomb, format="PNG")  # 35 Mpx in a few KB
    good = base64.b64encode(png((32, 32), 0)).decode()
    return [
        json.dumps({"inputs": nan.tolist()}).encode(),
        body("inputs", [None]), body("dataframe_split", [1, 2]), body("dataframe_records", [[1, 2]]),
        body("inputs", [base64.b64encode(bomb.getvalue()).decode()]),
        body("instances", [good] * 257),
        body("inputs", [good[:60]]),
        body("dataframe_records", [base64.b64encode(png((32, 32), 1, "TIFF")).decode()]),
        json.dumps({"inputs": np.full((1, 32, 32, 3), 127.5).tolist()}).encode(),
        body("inputs", ["%%% not base64"]),
    ]


def client(url: str, goods, hostiles, share: float, until: float, seed: int, out: dict, lock) -> None:
    """Send requests until `until`: a hostile one with probability `share`; check and time every answer."""
    rng, session = random.Random(seed), requests.Session()
    headers = {"Content-Type": "application/json"}
    while time.monotonic() < until:
        hostile = rng.random() < share
        data = rng.choice(hostiles) if hostile else None
        if not hostile:
            data, classes, probs = rng.choice(goods)
        start = time.perf_counter()
        response = session.post(url, data=data, headers=headers, timeout=120)
        took = time.perf_counter() - start
        if hostile:
            message = response.json().get("message", "") if response.status_code == 400 else ""
            wrong = response.status_code != 400 or not message or "\n" in message or "stack_trace" in response.text
        else:
            answers = response.json().get("predictions", []) if response.status_code == 200 else []
            wrong = [a["class"] for a in answers] != classes or not np.allclose(
                [a["probability"] for a in answers], probs, rtol=0, atol=1e-5)
        with lock:
            out["hostile" if hostile else "good"].append(took)
            if wrong:
                out["wrong"].append(f"{response.status_code} {response.text[:300]}")


def tree_memory(pgid: int) -> tuple[int, int]:
    """(current RSS, sum of peak RSSes) in bytes over the processes of process group `pgid`."""
    rss = hwm = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        rss += int(status.get("VmRSS", "0 kB").split()[0]) * 1024
        hwm += int(status.get("VmHWM", "0 kB").split()[0]) * 1024
    return rss, hwm


def load(url: str, pgid: int, goods, hostiles, args) -> dict:
    for data, *_ in goods * 2:  # warm-up: every good request twice, one at a time
        requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=300).raise_for_status()
    warm_rss, _ = tree_memory(pgid)
    out, lock = {"good": [], "hostile": [], "wrong": []}, threading.Lock()
    until = time.monotonic() + args.seconds
    threads = [threading.Thread(target=client, args=(url, goods, hostiles, args.hostile, until, seed, out, lock))
               for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    peak = warm_rss
    while any(thread.is_alive() for thread in threads):  # sampled every 0.1 s: a 175 MB decode lasts ~1 s
        peak = max(peak, tree_memory(pgid)[0])
        time.sleep(0.1)
    _, peaks = tree_memory(pgid)
    after = requests.post(url, data=goods[0][0], headers={"Content-Type": "application/json"}, timeout=60)
    out["next_good"] = after.status_code == 200 and [a["class"] for a in after.json()["predictions"]] == goods[0][1]
    return out | {"warm_rss": warm_rss, "peak": peak, "peaks": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hostile", type=float, default=0.5, help="share of hostile requests")
    parser.add_argument("--tta", default="none", choices=("none", "flip", "flip_translate"),
                        help="the served model's (params.yaml's default: none)")
    args = parser.parse_args()
    import mlflow

    from imgclf.config import load_params
    from imgclf.serving.pyfunc import log_served_model
    from imgclf.training import families

    print(cpu_header())
    params = load_params(str(REPO / "params.yaml"), [])
    model = families.REGISTRY.get(params["model"]["arch"]).build(params, 10, np.zeros((8, 32, 32, 3), np.uint8))
    goods, hostiles = good_requests(model, args.tta), hostile_requests()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-load-") as tmp:
        os.chdir(tmp)  # the scratch store's artifacts stay in it
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(store)
        with mlflow.start_run() as run:
            log_served_model(model, [str(i) for i in range(10)], args.tta, None)
        with served(f"runs:/{run.info.run_id}/model", store, 5399, Path(tmp) / "serve.log") as url:
            pgid = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                        if _is_server(pid, url))
            out = load(url, pgid, goods, hostiles, args)
    report(out, args)


def _is_server(pid: int, url: str) -> bool:
    """The `mlflow models serve` process serving `url` (the leader of the server's process group)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    port = url.rsplit(":", 1)[1].split("/")[0].encode()
    return b"serve" in cmdline and port in cmdline and os.getpgid(pid) == pid


def report(out: dict, args) -> None:
    print(f"{args.clients} clients for {args.seconds:g} s, {args.hostile:.0%} hostile; TTA {args.tta}")
    print(f"{'kind':<10}{'requests':>10}{'per s':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for kind in ("good", "hostile"):
        times = out[kind]
        print(f"{kind:<10}{len(times):>10}{len(times) / args.seconds:>8.1f}{p(times, 50):>10.1f}{p(times, 99):>10.1f}")
    print(f"wrong answers: {len(out['wrong'])}" + (f" (first: {out['wrong'][0]})" if out["wrong"] else ""))
    print(f"the next good request after the load: {'answered correctly' if out['next_good'] else 'WRONG'}")
    extra = (out["peak"] - out["warm_rss"]) / 2**20
    print(f"server RSS (all its processes): {out['warm_rss'] / 2**20:.0f} MiB warm, {out['peak'] / 2**20:.0f} MiB at "
          f"most under load (sampled every 0.1 s): +{extra:.0f} MiB, {verdict(extra, BOUND_MIB, False)}; the sum of "
          f"their VmHWM, since each started: {out['peaks'] / 2**20:.0f} MiB")
    if out["wrong"] or not out["next_good"] or extra > BOUND_MIB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
