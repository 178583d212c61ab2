"""Scale: prepare and train (fast family) on ~0.5, 2 and 6 GiB image folders, each run under a hard memory cap.

Also today's code (a git revision) on the first set past that cap, for comparison, and CIFAR-sized training
throughput with the arrays memory-mapped against in memory.

Data: image folders (train/<class>/*.png, 10 classes) of random-noise PNGs (compress_level 1) at --image-size px,
as many images as make --sizes GiB of decoded uint8 pixels, generated once in parallel into
benchmarks/.cache/scale/ (deterministic from --seed; a folder with its COMPLETE.json is reused). Before a set's
prepare runs its files are read once, so that every run finds them in the page cache alike.

Per set, each run is a fresh process (`--child`) inside its own cgroup v1 memory group (memory.limit_in_bytes,
and memory.memsw.limit_in_bytes where present), made below this process's own memory cgroup and removed after:
  prepare  imgclf.prepare.prepare(params, out) with params.yaml plus data.dataset=folder, data.path=<set>,
           data.image_size, data.workers=1 and then every core (null); images/s = decoded images / wall time
  train    what `imgclf train` does up to the fit, with its own functions: load_prepared (every array checked
           against the manifest), build_compiled (model.arch=fast), make_dataset with the family's augmentation
           (the stateless shuffle spans the whole file), model.fit for --steps steps (images/s from the steps
           after the first, which traces the graph), then tta.predict_logits on the first two batches of dev
The smallest set runs under --first-cap; every larger set under its peak anonymous memory + 1 GiB (or --cap).
With --before REV (default 41057bd, the code before this issue) the second set (the first past the cap) is also
prepared and trained by that revision's src/ and params.yaml, under the same cap, to show what happens there.

Memory, per run: "VmHWM" is the largest peak resident set of the child or any process it waited for (getrusage
via wait4; it counts mapped file pages, which the kernel can reclaim); "anon" is the peak anonymous + shmem
memory, sampled every 50 ms (the cgroup's memory.stat rss + shmem when capped, each page once; uncapped, the
sum over the process tree of RssAnon + RssShmem); "cgroup max" is memory.max_usage_in_bytes (page cache too).
An OOM kill shows as exit -9 and in memory.oom_control. Uncapped when cgroup v1 memory or root is missing
(said in one line).

Prepare speed: --speed-repeats interleaved pairs of prepare runs (1 worker, every core) on the largest set,
uncapped, so that every image is in the page cache (under the cap a set larger than it is read from disk, and
the capped runs above measure the disk); the speed-up target is judged on their medians.

CIFAR-sized: fast family on --cifar-images random 32x32 uint8 images, batch --cifar-batch, --cifar-steps steps,
with the arrays np.load-ed (make_dataset's tf.constant path) or np.load(mmap_mode="r") (its gather-from-the-map
path); fresh processes, interleaved, medians of --cifar-repeats.

Raw results: benchmarks/.cache/scale/results.json; child logs: benchmarks/.cache/scale/logs/.

At 224 px the fast net trains ~2-4 images/s on a 2-core CPU and a batch of 32 holds ~5 GiB of activations, so
the defaults (batch 32, 20 steps a set) keep the whole benchmark to about half an hour there; the sets themselves
(~9 GiB of PNG) take ~8 minutes to generate the first time (--generate-only does just that).

Usage: python benchmarks/scale.py [--speed-repeats 3] [--speed-only] [--sizes 0.5,2,6] [--image-size 224] [--steps 20] [--batch N] [--no-before]
       [--before REV] [--cap GIB] [--first-cap 16] [--workers 1,all] [--cifar-repeats 3] [--timeout 1800]
       [--set KEY=VALUE ...] [--generate-only]
       tiny check: python benchmarks/scale.py --sizes 0.005,0.01 --image-size 64 --steps 3 --batch 64
                   --cifar-repeats 1 --cifar-steps 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import REPO, child_env, cpu_header, own_peak_rss, verdict

GIB = 1 << 30
CACHE = REPO / "benchmarks" / ".cache" / "scale"
CLASSES = 10
SAMPLE_S = 0.05         # memory sampling period
TREE_SCAN_S = 1.0       # how often an uncapped run's process tree is listed again
HEADROOM = GIB          # the cap past the smallest set: its peak anon + this
TARGET_GROWTH, TARGET_PREPARE_SPEEDUP, TARGET_CIFAR = 0.10, 1.7, 0.95
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


# ----------------------------------------------------------------------------------------------- data sets

def images_for(gib: float, size: int) -> int:
    """How many size x size RGB images make `gib` GiB of uint8 pixels (at least 10 a class, for the dev split)."""
    return max(10 * CLASSES, round(gib * GIB / (size * size * 3)))


def _write_pngs(job: tuple[str, int, int, int, int]) -> int:
    """Images start..stop-1 of a set: noise seeded by (seed, size, index), so any worker count writes the same."""
    from PIL import Image

    root, size, seed, start, stop = job
    for i in range(start, stop):
        path = Path(root, "train", f"class{i % CLASSES}", f"{i:06d}.png")
        if path.exists():  # written whole by an earlier, interrupted generation
            continue
        pixels = np.random.default_rng([seed, size, i]).integers(0, 256, (size, size, 3), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp")  # a dotfile: the folder source skips it
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    return stop - start


def generate(gib: float, size: int, seed: int) -> dict:
    """The image folder of `gib` GiB at `size` px, generated on every core unless its COMPLETE.json matches."""
    n = images_for(gib, size)
    root = CACHE / f"folder-{gib:g}gib-{size}px"
    marker, want = root / "COMPLETE.json", {"images": n, "image_size": size, "seed": seed, "classes": CLASSES}
    if marker.is_file() and {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want:
        return {"gib": gib, "path": str(root), **json.loads(marker.read_text())}
    start = time.perf_counter()
    for c in range(CLASSES):
        (root / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), size, seed, i, min(i + 256, n)) for i in range(0, n, 256)]
    done = 0
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for count in pool.imap_unordered(_write_pngs, jobs):
            done += count
            print(f"\rgenerating {root.name}: {done}/{n}", end="", flush=True)
    on_disk = sum(p.stat().st_size for p in (root / "train").rglob("*.png"))
    marker.write_text(json.dumps({**want, "bytes_on_disk": on_disk, "pixel_bytes": n * size * size * 3}))
    print(f"\rgenerated {root.name}: {n} images, {on_disk / GIB:.2f} GiB of PNG in "
          f"{time.perf_counter() - start:.0f} s (not timed)", flush=True)
    return {"gib": gib, "path": str(root), **json.loads(marker.read_text())}


def warm(root: Path) -> None:
    """Read every file of the set once, so that each prepare run finds it in the page cache alike."""
    for path in sorted(root.rglob("*.png")):
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def cifar_arrays(n: int, seed: int) -> tuple[Path, Path]:
    """n random 32x32x3 uint8 images and labels i % 10, saved once as .npy."""
    folder = CACHE / f"cifar-{n}"
    x_path, y_path = folder / "x.npy", folder / "y.npy"
    if not (x_path.is_file() and np.load(x_path, mmap_mode="r").shape == (n, 32, 32, 3) and y_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        np.save(x_path, np.random.default_rng([seed, 32]).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(y_path, np.arange(n, dtype=np.int64) % CLASSES)
    return x_path, y_path


def before_tree(rev: str) -> Path:
    """src/ and params.yaml of `rev`, extracted once (git archive) into the cache."""
    dest = CACHE / "before" / rev
    if not (dest / "src" / "imgclf").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src", "params.yaml"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


# -------------------------------------------------------------------------------------------- memory caps

class Cgroups:
    """cgroup v1 memory groups below this process's own memory cgroup: one per capped run, removed after."""

    def __init__(self):
        self.base, self.facts = self._find()
        self.count = itertools.count(1)

    @staticmethod
    def _find() -> tuple[Path | None, str]:
        if not (CGROUP_V1 / "memory.limit_in_bytes").is_file():
            return None, f"no cgroup v1 memory controller at {CGROUP_V1}: every run is UNCAPPED"
        if os.geteuid() != 0:
            return None, "not root, so no cgroup v1 memory group can be made: every run is UNCAPPED"
        own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if "memory" in line.split(":", 2)[1].split(",")), None)
        base = CGROUP_V1 / (own or "/").lstrip("/")
        probe = base / f"imgclf-scale-{os.getpid()}-probe"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            return None, f"cannot make a memory cgroup in {base} ({exc}): every run is UNCAPPED"
        memsw = (base / "memory.memsw.limit_in_bytes").is_file()
        hierarchy = (base / "memory.use_hierarchy").read_text().strip()
        return base, (f"cgroup v1 memory: one group per run below {base} (use_hierarchy={hierarchy}); "
                      f"memory.limit_in_bytes{' and memory.memsw.limit_in_bytes (swap counted)' if memsw else ''}"
                      f"; machine RAM {_meminfo('MemTotal') / GIB:.1f} GiB, swap {_meminfo('SwapTotal') / GIB:.1f} GiB")

    def make(self, cap: int) -> Path:
        group = self.base / f"imgclf-scale-{os.getpid()}-{next(self.count)}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        if (group / "memory.memsw.limit_in_bytes").is_file():  # memsw >= limit: written after it
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        return group

    @staticmethod
    def remove(group: Path) -> int:
        """Kill what is left in the group (our child's own descendants), then remove it; returns how many."""
        left = _pids(group / "cgroup.procs")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:  # EBUSY until the killed processes are gone
                time.sleep(0.05)
        return len(left)


def _meminfo(key: str) -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _pids(procs_file: Path) -> list[int]:
    try:
        return [int(p) for p in procs_file.read_text().split()]
    except OSError:
        return []


def _status_bytes(pid: int, keys: tuple[str, ...]) -> int:
    """Sum of /proc/<pid>/status fields `keys` (kB) in bytes; 0 for a process already gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in lines if line.split(":")[0] in keys)


def _descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _cgroup_anon(group: Path) -> int:
    """Anonymous + shmem bytes charged to the group (memory.stat rss + shmem: each page once)."""
    try:
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    except OSError:
        return 0
    return int(stat.get("rss", 0)) + int(stat.get("shmem", 0))


def run_child(key: str, args: list[str], cap: int | None, cgroups: Cgroups, timeout: float,
              env: dict | None = None) -> dict:
    """`python scale.py ARGS` (ARGS hold --child) in a fresh process, in its own capped memory cgroup when `cap` and
    cgroups allow; its memory sampled meanwhile; output in logs/<key>.out|err. Never raises for the child's
    failure: the row says it (one still running after `timeout` seconds is killed)."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, *args]
    group = cgroups.make(cap) if cap and cgroups.base else None
    if group:  # the child joins the group before Python starts
        cmd = ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$0" "$@"', *cmd]
    anon_keys = ("RssAnon", "RssShmem")
    row = {"key": key, "cap": cap if group else None, "anon": 0, "tree_anon": 0, "tree_rss": 0}
    start, proc = time.perf_counter(), None
    try:
        with open(logs / f"{key}.out", "w") as out, open(logs / f"{key}.err", "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env or child_env())
            tree, scanned = [proc.pid], 0.0
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = time.perf_counter()
                if now - start > timeout and not row.get("timed_out"):  # a hang: the child and all below it
                    row["timed_out"] = True
                    for victim in _descendants(proc.pid):
                        try:
                            os.kill(victim, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                if group:
                    tree = _pids(group / "cgroup.procs")
                elif now - scanned > TREE_SCAN_S:
                    tree, scanned = _descendants(proc.pid), now
                tree_anon = sum(_status_bytes(p, anon_keys) for p in tree)
                row["tree_anon"] = max(row["tree_anon"], tree_anon)
                row["tree_rss"] = max(row["tree_rss"], sum(_status_bytes(p, ("VmRSS",)) for p in tree))
                row["anon"] = max(row["anon"], _cgroup_anon(group) if group else tree_anon)
                time.sleep(SAMPLE_S)
            proc.returncode = os.waitstatus_to_exitcode(status)
        row |= {"exit": proc.returncode, "wall_s": time.perf_counter() - start, "vmhwm": usage.ru_maxrss * 1024}
        if group:
            row["cgroup_max"] = int((group / "memory.max_usage_in_bytes").read_text())
            row["failcnt"] = int((group / "memory.failcnt").read_text())
            oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
            row["oom_kills"] = int(oom.get("oom_kill", 0))
    finally:
        if proc and proc.returncode is None:  # interrupted: no child outlives the benchmark
            proc.kill()
            proc.wait()
        if group:
            row["left_behind"] = cgroups.remove(group)
    lines = (logs / f"{key}.out").read_text().strip().splitlines()
    if proc.returncode == 0 and lines:
        row |= json.loads(lines[-1])
    else:
        tail = (logs / f"{key}.err").read_text().strip().splitlines()[-3:]
        row["error"] = " | ".join(tail)
    return row


# ---------------------------------------------------------------------------------------------- children

def folder_overrides(folder: str, image_size: int) -> list[str]:
    """The set as data source; the fast family, which takes any image size (config checks it even in prepare)."""
    return ["data.dataset=folder", f"data.path={folder}", f"data.image_size={image_size}", "model.arch=fast"]


def child_params(params_file: str, overrides: list[str]) -> dict:
    """params.yaml with the run's overrides, validated as the CLI does."""
    from imgclf.config import load_params

    return load_params(params_file, overrides)


def child_prepare(params_file: str, folder: str, out: str, image_size: int, workers: str, sets: list[str]) -> dict:
    """imgclf.prepare.prepare on the folder; data.workers only where that code has the key (today's has not)."""
    import imgclf
    from imgclf import config, prepare

    overrides = folder_overrides(folder, image_size)
    if "workers" in config.schema()["data"]:
        overrides.append(f"data.workers={'null' if workers == 'all' else workers}")
    params = child_params(params_file, overrides + sets)
    start = time.perf_counter()
    manifest = prepare.prepare(params, out)
    wall = time.perf_counter() - start
    images = sum(split["count"] for split in manifest["splits"].values())
    return {"wall_s": wall, "images": images, "images_per_s": images / wall, "imgclf": imgclf.__file__,
            "data_workers": params["data"].get("workers", "absent"), "own_rss": own_peak_rss()}


def fit_steps(params: dict, x, y, num_classes: int, batch: int, steps: int) -> tuple[object, dict]:
    """What `imgclf train` runs up to its fit, then `steps` steps of it; the model and the timings."""
    import keras

    from imgclf.training import families
    from imgclf.training.input_pipeline import make_dataset, steps_per_epoch
    from imgclf.training.distribute import make_strategy
    from imgclf.train import build_compiled

    start = time.perf_counter()
    model = build_compiled(params, num_classes, make_strategy("none"), x)
    build_s = time.perf_counter() - start
    ends: list[float] = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    epochs = math.ceil(steps / steps_per_epoch(len(x), batch))  # a small set runs out of batches in one epoch
    dataset = make_dataset(x, y, batch, params["seed"], 0, epochs, families.REGISTRY.get("fast").augment(params))
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, callbacks=[StepTimer()], verbose=0)
    fit_s = time.perf_counter() - start
    timed = ends[-1] - ends[0] if len(ends) > 1 else float("nan")
    return model, {"build_s": build_s, "fit_s": fit_s, "first_step_s": ends[0] - start, "steps": len(ends),
                   "images_per_s": batch * (len(ends) - 1) / timed, "batch": batch, "array_type": type(x).__name__}


def child_train(params_file: str, prepared: str, folder: str, image_size: int, batch: int, steps: int,
                sets: list[str]) -> dict:
    """Load (and check) the prepared arrays, build the fast net, `steps` training steps, predict two dev batches."""
    import imgclf

    params = child_params(params_file, [*folder_overrides(folder, image_size), f"train.batch_size={batch}", *sets])
    from imgclf.training.numerics import seed_everything, use_numerics

    use_numerics(params["train"]["numerics"], params["train"]["kernels"])  # before TensorFlow loads, as `imgclf train`
    from imgclf.files.prepared_reader import load_prepared
    from imgclf.tta import predict_logits

    cfg = params["train"]
    seed_everything(params["seed"], cfg["jit_compile"], cfg["tf32"])
    start = time.perf_counter()
    splits, manifest = load_prepared(prepared)
    load_s = time.perf_counter() - start
    (x, y), (x_dev, _) = splits["train"], splits["dev"]
    model, timings = fit_steps(params, x, y, len(manifest["classes"]), batch, steps)
    start = time.perf_counter()
    logits = predict_logits(model, x_dev[:2 * batch], "none", batch)
    return {**timings, "load_s": load_s, "predict_s": time.perf_counter() - start, "predicted": len(logits),
            "train_images": len(x), "imgclf": imgclf.__file__, "own_rss": own_peak_rss()}


def child_cifar(mode: str, x_path: str, y_path: str, batch: int, steps: int, sets: list[str]) -> dict:
    """The fast family on CIFAR-sized arrays, loaded into memory or memory-mapped."""
    params = child_params(str(REPO / "params.yaml"), ["model.arch=fast", f"train.batch_size={batch}", *sets])
    from imgclf.training.numerics import seed_everything, use_numerics

    use_numerics(params["train"]["numerics"], params["train"]["kernels"])
    seed_everything(params["seed"], params["train"]["jit_compile"], params["train"]["tf32"])
    mmap = "r" if mode == "mmap" else None
    x, y = np.load(x_path, mmap_mode=mmap), np.load(y_path, mmap_mode=mmap)
    _, timings = fit_steps(params, x, y, CLASSES, batch, steps)
    return {**timings, "own_rss": own_peak_rss()}


def child(argv: list[str], sets: list[str]) -> None:
    kind, *rest = argv
    if kind == "prepare":
        result = child_prepare(rest[0], rest[1], rest[2], int(rest[3]), rest[4], sets)
    elif kind == "train":
        result = child_train(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]), sets)
    else:
        result = child_cifar(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), sets)
    print(json.dumps(result))


# -------------------------------------------------------------------------------------------------- main

def default_batch(size: int) -> int:
    """The fast preset's 1024 at 32 px scaled to as many pixels, rounded up to a power of two: 32 at 224 px,
    64 at 128, 256 at 64."""
    return int(max(8, min(1024, 2 ** math.ceil(math.log2(1024 * (32 / size) ** 2)))))


def gib(value) -> str:
    return "-" if value in (None, 0) else f"{value / GIB:.2f}"


def exit_text(row: dict) -> str:
    text = str(row["exit"])
    if row.get("timed_out"):
        text += " (timed out: killed)"
    elif row.get("oom_kills"):
        text += f" (OOM kill x{row['oom_kills']})"
    elif row["exit"] == -9:
        text += " (SIGKILL)"
    if row.get("left_behind"):
        text += f", {row['left_behind']} process(es) left behind"
    return text


def table(rows: list[dict]) -> list[str]:
    lines = ["| set GiB | images | code | run | cap GiB | exit | peak VmHWM GiB | peak anon GiB | cgroup max GiB "
             "| images/s | batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
        batch = r.get("batch", "-") if r["stage"] == "train" else "-"
        lines.append(f"| {r['set_gib']:g} | {r['set_images']} | {r['code']} | {r['run']} | {gib(r['cap'])} "
                     f"| {exit_text(r)} | {gib(r['vmhwm'])} | {gib(r['anon'])} | {gib(r.get('cgroup_max'))} "
                     f"| {rate} | {batch} |")
    return lines


def progress(row: dict) -> str:
    """One line on a finished run, as it ends."""
    rate = f", {row['images_per_s']:.1f} images/s" if "images_per_s" in row else ""
    error = f"; stderr: {row['error'][-300:]}" if row.get("error") else ""
    return (f"exit {exit_text(row)} after {row['wall_s']:.1f} s{rate}, VmHWM {gib(row['vmhwm'])} GiB, anon "
            f"{gib(row['anon'])} GiB, cgroup max {gib(row.get('cgroup_max'))} GiB{error}")


def workers_name(workers: str) -> str:
    return {"1": "1 worker", "all": f"all ({os.cpu_count()}) workers"}.get(workers, f"{workers} workers")


def run_set(data: dict, cap: int | None, args, cgroups: Cgroups, before: Path | None) -> list[dict]:
    """prepare with each worker count, train, and (with `before`) today's prepare and train; one row each."""
    folder, size, tag = data["path"], args.image_size, f"{data['gib']:g}gib"
    prepared = CACHE / f"prepared-{tag}"
    warm(Path(folder))
    sets = [arg for s in args.set for arg in ("--set", s)]
    rows = []

    def run(code: str, stage: str, workers: str | None, child_args: list[str], env: dict | None = None) -> None:
        key = f"{tag}-{code}-{stage}" + (f"-w{workers}" if workers and code == "ours" else "")
        run_name = f"{stage}, {workers_name(workers)}" if workers and code == "ours" else \
            f"{stage}, {args.steps} steps" if stage == "train" else stage
        row = run_child(key, [*sets, "--child", stage, *child_args], cap, cgroups, args.timeout, env)
        row |= {"set_gib": data["gib"], "set_images": data["images"], "code": code, "stage": stage,
                "workers": workers, "run": run_name}
        rows.append(row)
        print(f"  {key}: {progress(row)}", flush=True)

    ours = str(REPO / "params.yaml")
    for workers in args.workers:
        shutil.rmtree(prepared, ignore_errors=True)
        run("ours", "prepare", workers, [ours, folder, str(prepared), str(size), workers])
    train_args = [str(prepared), folder, str(size), str(args.batch), str(args.steps)]
    run("ours", "train", None, [ours, *train_args])
    if before:
        env, old = {**child_env(), "PYTHONPATH": str(before / "src")}, str(before / "params.yaml")
        old_out = CACHE / f"prepared-{tag}-before"
        run(args.before, "prepare", "1", [old, folder, str(old_out), str(size), "1"], env)
        run(args.before, "train", None, [old, *train_args], env)  # on our prepared arrays: the same bytes
        shutil.rmtree(old_out, ignore_errors=True)
    for leftover in [prepared, *CACHE.glob(f".{prepared.name}*.tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return rows


def run_speed(data: dict, args, cgroups: Cgroups) -> dict[str, list[dict]]:
    """prepare's images/s on `data` with each worker count, interleaved, uncapped: every image is in the page
    cache (a capped run of a set larger than the cap reads them from disk, so it measures the disk)."""
    folder, tag, runs = data["path"], f"{data['gib']:g}gib", {w: [] for w in args.workers}
    prepared, ours = CACHE / f"prepared-{tag}-speed", str(REPO / "params.yaml")
    sets = [arg for s in args.set for arg in ("--set", s)]
    warm(Path(folder))
    for i in range(args.speed_repeats):
        for workers in args.workers:
            shutil.rmtree(prepared, ignore_errors=True)
            row = run_child(f"speed-{tag}-w{workers}-{i + 1}", [*sets, "--child", "prepare", ours, folder,
                            str(prepared), str(args.image_size), workers], None, cgroups, args.timeout)
            if row["exit"] != 0:
                raise SystemExit(f"prepare ({workers_name(workers)}) failed ({row['exit']}): {row.get('error')}")
            runs[workers].append(row)
            print(f"  speed run {i + 1}, {workers_name(workers)}: {progress(row)}", flush=True)
    shutil.rmtree(prepared, ignore_errors=True)
    return runs


def run_cifar(args, cgroups: Cgroups) -> dict[str, list[dict]]:
    x_path, y_path = cifar_arrays(args.cifar_images, args.seed)
    runs: dict[str, list[dict]] = {"memory": [], "mmap": []}
    sets = [arg for s in args.set for arg in ("--set", s)]
    for i in range(args.cifar_repeats):
        for mode in runs:
            row = run_child(f"cifar-{mode}-{i + 1}", [*sets, "--child", "cifar", mode, str(x_path), str(y_path),
                                                      str(args.cifar_batch), str(args.cifar_steps)], None, cgroups,
                            args.timeout)
            if row["exit"] != 0:
                raise SystemExit(f"cifar {mode} failed ({row['exit']}): {row.get('error')}")
            runs[mode].append(row)
            print(f"  cifar {mode} run {i + 1}: {progress(row)}, {row['array_type']}", flush=True)
    return runs


def verdicts(rows: list[dict], sets: list[dict], cap: int | None, cifar: dict, speed: dict, args) -> list[str]:
    """The issue's targets, each with verdict()."""
    ours = [r for r in rows if r["code"] == "ours"]
    small, large = sets[0]["gib"], sets[-1]["gib"]
    lines = []
    if len(sets) > 1 and ours:
        last = [r for r in ours if r["set_gib"] == large]
        failed = sum(r["exit"] != 0 for r in last)
        lines.append(f"{large:g} GiB set, runs that did not exit 0 under the cap of {gib(cap)} GiB: {failed} of "
                     f"{len(last)}   {verdict(failed, 0, higher_is_better=False)}")
        peak = {g: max(r["anon"] for r in ours if r["set_gib"] == g) for g in (small, large)}
        growth = peak[large] / peak[small] - 1
        all_ok = all(r["exit"] == 0 for r in ours if r["set_gib"] in (small, large))
        judged = verdict(growth, TARGET_GROWTH, higher_is_better=False) if all_ok else \
            "MISSED (a run failed: its peak is where it stopped)"
        lines.append(f"peak anon, {small:g} -> {large:g} GiB set: {gib(peak[small])} -> {gib(peak[large])} GiB = "
                     f"{growth:+.1%}   {judged}")
        hwm = {g: max(r["vmhwm"] for r in ours if r["set_gib"] == g) for g in (small, large)}
        lines.append(f"  (peak VmHWM, mapped file pages included: {gib(hwm[small])} -> {gib(hwm[large])} GiB = "
                     f"{hwm[large] / hwm[small] - 1:+.1%})")
    rate = {w: statistics.median(r["images_per_s"] for r in runs) for w, runs in speed.items() if runs}
    many = next((w for w in ("2", "all") if rate.get(w)), None)
    if rate.get("1") and many:
        ratio = rate[many] / rate["1"]
        lines.append(f"prepare on the {large:g} GiB set, uncapped, {workers_name(many)} / 1 worker: {rate[many]:.1f} / "
                     f"{rate['1']:.1f} images/s = {ratio:.2f}x (medians of {args.speed_repeats}, interleaved)   "
                     f"{verdict(ratio, TARGET_PREPARE_SPEEDUP)}")
    if cifar["memory"]:
        med = {m: statistics.median(r["images_per_s"] for r in runs) for m, runs in cifar.items()}
        ratio = med["mmap"] / med["memory"]
        lines.append(f"CIFAR-sized training, memory-mapped / in memory: {med['mmap']:.1f} / {med['memory']:.1f} "
                     f"images/s = {ratio:.3f}x (medians of {args.cifar_repeats}, {args.cifar_images} images, batch "
                     f"{args.cifar_batch}, {args.cifar_steps - 1} timed steps)   {verdict(ratio, TARGET_CIFAR)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,2,6", help="GiB of decoded pixels per set, smallest first")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--steps", type=int, default=20, help="training steps per set; the first is not timed")
    parser.add_argument("--batch", type=int, help="training batch size (default: 32 at 224 px, see default_batch)")
    parser.add_argument("--workers", default="1,all", help="data.workers of each prepare run ('all' = null)")
    parser.add_argument("--first-cap", type=float, default=16.0, help="GiB cap of the smallest set")
    parser.add_argument("--cap", type=float, help="GiB cap of the larger sets (default: smallest set's peak anon "
                                                  "+ 1 GiB)")
    parser.add_argument("--before", default="41057bd", help="git revision of today's code, run on the second set")
    parser.add_argument("--no-before", action="store_true")
    parser.add_argument("--cifar-images", type=int, default=6000)
    parser.add_argument("--cifar-batch", type=int, default=256)
    parser.add_argument("--cifar-steps", type=int, default=8, help="the first is not timed")
    parser.add_argument("--cifar-repeats", type=int, default=3, help="0 skips the CIFAR-sized runs")
    parser.add_argument("--speed-repeats", type=int, default=3, help="interleaved uncapped prepare runs per worker "
                                                                     "count on the largest set (0: none)")
    parser.add_argument("--speed-only", action="store_true", help="only those prepare speed runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override for every run, e.g. model.fast.whiten_images=500")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed (a hang)")
    parser.add_argument("--generate-only", action="store_true", help="make the data sets (and the old code's tree), "
                                                                      "then stop")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.set)
        return
    sys.path.insert(0, str(REPO / "src"))  # cpu_header reads imgclf.training.machine; children get PYTHONPATH instead
    sizes = sorted(float(s) for s in args.sizes.split(","))
    args.workers = args.workers.split(",")
    args.batch = args.batch or default_batch(args.image_size)
    cgroups = Cgroups()
    print(cpu_header())
    print(cgroups.facts, flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    sets = [generate(g, args.image_size, args.seed) for g in sizes]
    before = None if args.no_before else before_tree(args.before)
    if args.generate_only:
        return
    print(f"training: fast family at {args.image_size} px, batch {args.batch}, {args.steps} steps (first untimed)"
          + (f"; overrides {args.set}" if args.set else ""), flush=True)
    rows, cap = [], int(args.cap * GIB) if args.cap else None
    for i, data in enumerate([] if args.speed_only else sets):
        this_cap = int(args.first_cap * GIB) if i == 0 else cap
        print(f"\n{data['gib']:g} GiB set: {data['images']} images at {args.image_size} px, cap "
              f"{gib(this_cap) if cgroups.base else 'none'} GiB", flush=True)
        run_before = before if i == min(1, len(sets) - 1) else None
        rows += run_set(data, this_cap, args, cgroups, run_before)
        if i == 0 and cap is None:
            first = [r for r in rows if r["code"] == "ours"]
            cap = max(r["anon"] for r in first) + HEADROOM
            failed = "" if all(r["exit"] == 0 for r in first) else \
                " (WARNING: some of its runs failed, so this cap is not what the code needs)"
            print(f"cap of the larger sets: this set's peak anon {gib(cap - HEADROOM)} GiB + 1 GiB = {gib(cap)} GiB"
                  f"{failed}", flush=True)
    cifar = run_cifar(args, cgroups) if args.cifar_repeats and not args.speed_only else {"memory": [], "mmap": []}
    print(f"\nprepare speed on the {sets[-1]['gib']:g} GiB set, uncapped:", flush=True)
    speed = run_speed(sets[-1], args, cgroups) if args.speed_repeats else {}
    print(f"\n{cpu_header()}\n{cgroups.facts}")
    print(f"fast family at {args.image_size} px, batch {args.batch}, {args.steps} training steps (images/s from "
          f"steps 2+); prepare images/s = decoded images / wall time; peak anon = non-reclaimable memory "
          f"(the cap is the smallest set's + 1 GiB)")
    print("\n".join(table(rows)))
    lines = verdicts(rows, sets, cap, cifar, speed, args)
    print("\n" + "\n".join(lines))
    (CACHE / "results.json").write_text(json.dumps(
        {"cpu": cpu_header(), "cgroup": cgroups.facts, "args": vars(args), "sets": sets, "cap": cap, "runs": rows,
         "cifar": cifar, "speed": speed, "verdicts": lines}, indent=1))
    print(f"raw results: {CACHE / 'results.json'}")


if __name__ == "__main__":
    main()
