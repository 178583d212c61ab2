"""Whether a rerun on another kind of machine reproduced the *result*, where the bits cannot match.

Native kernels sum in the CPU's own orders (and a GPU's in its own), so a rerun on another CPU model or ISA,
or another device, gives other weights by design: `imgclf rerun` says DIFF. What a person there asks next is
whether the scores came out the same up to noise. The noise is the spread of the final scores over seeds of the
same preset (a rerun whose score differs from the original's by no more than two seeds differ is as good a
reproduction as the preset allows). Each tolerance below says where it comes from, measured or chosen; a preset
without one gets no verdict, rather than a guessed one.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgclf.tracking.keys import metric_history, run_metric

# The tags that say which kind of machine computed a run (tracking.context's environment tags).
MACHINE_TAGS = ("cpu_model", "cpu_isa", "device")


@dataclass(frozen=True)
class Spread:
    metric: str        # the score compared, as training logs it per epoch (its last epoch's value)
    tolerance: float   # the largest difference between two seeds' final `metric` measured for the preset
    source: str        # where the measurement is written down


# (preset, data.dataset, train.training_epochs) -> the measured seed-to-seed spread of its final dev score.
SPREADS = {
    # `make run` (params.yaml as committed), native, AMD EPYC Zen 4 (AVX-512 BF16), 2 cores, 2026-12-07; seeds 51,
    # 52, 53 each prepared, trained and evaluated (a seed also draws the dev split, as `imgclf experiments` does):
    # dev macro-F1 0.9889, 0.9889, 1.0000, a range of 0.0111 (two of the 180 dev images). Three seeds: a small
    # sample, docs/reproducibility.md#a-result-where-the-bits-differ says so.
    ("report", "digits", 50): Spread("dev_f1_macro", 0.0111, "seeds 51, 52, 53 of `make run`, "
                                     "docs/reproducibility.md"),
    # The fast presets' final dev accuracy (with TTA) on the 45,000/5,000 CIFAR-10 split, docs/performance.md:
    # fast float32 seeds 51, 52: 0.9396, 0.9374 (2026-12-01); fast_muon float32 0.9366, 0.9372; fast_muon bfloat16
    # 0.9382, 0.9366 (2026-12-05). The largest gap, 0.0022, stands for both presets.
    ("fast", "cifar10", 10): Spread("dev_accuracy", 0.0022, "seeds 51, 52 of fast and fast_muon, "
                                    "docs/performance.md"),
    ("fast_muon", "cifar10", 8): Spread("dev_accuracy", 0.0022, "seeds 51, 52 of fast and fast_muon, "
                                        "docs/performance.md"),
}


def preset(params: dict[str, str]) -> tuple[str, str, int]:
    """The SPREADS key of a run, from its logged (flattened) params."""
    arch = params.get("model.arch", "?")
    name = "fast_muon" if arch == "fast" and params.get("model.fast.optimizer") == "muon" else arch
    try:
        epochs = int(params.get("train.training_epochs", "0"))
    except ValueError:
        epochs = 0
    return name, params.get("data.dataset", "?"), epochs


def other_machine(original_tags: dict, new_tags: dict) -> list[str]:
    """The machine tags whose values differ between the two runs."""
    return [tag for tag in MACHINE_TAGS if original_tags.get(tag) != new_tags.get(tag)]


def final_score(client, run_id: str, metric: str) -> float | None:
    """`metric` at the run's last epoch as training logged it (evaluate may log the same key later, at the
    same step, with TTA: the earliest point of the last step is training's)."""
    history = metric_history(client, run_id, metric)
    if not history:
        return None
    last = max(m.step for m in history)
    return min((m for m in history if m.step == last), key=lambda m: m.timestamp).value


def across_machines(client, original, new_run_id: str) -> list[str]:
    """After a DIFF: nothing when both runs ran on the same kind of machine (the bits should have matched);
    otherwise the verdict on the result, also set as the rerun's tag `result_reproduced` (true, false)."""
    new = client.get_run(new_run_id)
    differ = other_machine(original.data.tags, new.data.tags)
    if not differ:
        return []
    reproduced, lines = judge(client, original, new)
    if reproduced is not None:
        client.set_tag(new_run_id, "result_reproduced", str(reproduced).lower())
    return [f"  another kind of machine ({', '.join(differ)} differ): the bits cannot match; the scores:", *lines]


def judge(client, original, new) -> tuple[bool | None, list[str]]:
    """(reproduced, lines): the final scores beside each other, the tolerance and its source, then REPRODUCED
    or NOT REPRODUCED in one line; (None, one line saying why) when there is nothing to judge by."""
    key = preset(original.data.params)
    spread = SPREADS.get(key)
    if spread is None:
        return None, [f"RESULT NOT JUDGED: no measured seed-to-seed spread for preset {key[0]} on {key[1]} with "
                      f"{key[2]} epochs (imgclf.tracking.verdict.SPREADS); compare the scores by hand"]
    before = final_score(client, original.info.run_id, spread.metric)
    now = final_score(client, new.info.run_id, spread.metric)
    if before is None or now is None:
        return None, [f"RESULT NOT JUDGED: a run has no {spread.metric} (original {before}, rerun {now})"]
    lines = [f"  {spread.metric}: original {before:.4f}, rerun {now:.4f}; tolerance {spread.tolerance:.4f}, the "
             f"largest seed-to-seed difference of {spread.source}", *test_scores(original, new)]
    reproduced = abs(now - before) <= spread.tolerance
    lines.append(f"{'REPRODUCED' if reproduced else 'NOT REPRODUCED'}: {spread.metric} {now:.4f} (rerun) against "
                 f"{before:.4f} (original), difference {abs(now - before):.4f} "
                 f"{'<=' if reproduced else '>'} tolerance {spread.tolerance:.4f}")
    return reproduced, lines


def test_scores(original, new) -> list[str]:
    """The test scores beside each other where both runs were evaluated on a test split (reported, not judged:
    no seed spread is measured on test)."""
    lines = []
    for key in ("test_f1_macro", "test_accuracy"):
        before, now = run_metric(original, key), run_metric(new, key)
        if before is not None:
            lines.append(f"  {key}: original {before:.4f}, rerun "
                         + (f"{now:.4f}" if now is not None else "not evaluated (run `imgclf evaluate` on it)"))
    return lines
