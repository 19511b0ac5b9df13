"""How well does the tuning cost model rank schedules? Replays a tuning log into it and scores it.

The records of every kernel in the log are split 2/3 : 1/3. The training part is fed to one
shared model in batches of 16, kernel after kernel, as a joint tuning run feeds it; the model
then predicts the held-out records, which were measured, so each kernel gets:
  spearman   rank correlation of predicted and measured speed (1 = perfect order, 0 = random)
  <=0        share of predictions <= 0 (MetaSchedule clamps them to 0: the search sees no signal)
  top1/best  measured speed of the model's favourite / the best held-out record's speed
Both models run in one invocation on the same split: TVM's stock XGBModel and autotune's.

    python tools/cost_model_replay.py [--log schedules/x86] [--min-records 48]
Writes tools/results/cost_model.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tvm
from scipy.stats import spearmanr
from tvm.s_tir import meta_schedule as ms

import autotune  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
from autotune.support.targets import resolve_target
from autotune.support.threads import physical_thread_count
from autotune.tuning.cost_model import make_cost_model
from autotune.tuning.log import TuningLog

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 16


def kernel_label(record) -> str:
    """The kernel's argument shapes, e.g. `1x1560x1536 8960x1536 8960 1x1560x8960`."""
    return " ".join("x".join(str(d) for d in arg.shape) for arg in record.args_info)


def load_kernels(log_dir: str, target) -> list[dict]:
    by_workload: dict = {}
    for record in TuningLog(log_dir, target).get_all_tuning_records():
        if record.run_secs:
            by_workload.setdefault(record.workload, []).append(record)
    extractor = ms.feature_extractor.PerStoreFeature()
    kernels = []
    for workload, records in by_workload.items():
        context = ms.TuneContext(mod=workload.mod, target=target, num_threads=1)
        candidates, results = [], []
        for record in records:
            sch = tvm.s_tir.Schedule(workload.mod)
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            candidates.append(ms.MeasureCandidate(sch, record.args_info))
            results.append(ms.runner.RunnerResult(run_secs=list(record.run_secs), error_msg=None))
        order = np.random.default_rng(0).permutation(len(candidates))
        kernels.append({
            "label": kernel_label(records[0]),
            "blocks": len(extractor.extract_from(context, candidates[:1])[0].numpy()),
            "context": context, "candidates": candidates, "results": results,
            "train": order[: len(order) * 2 // 3], "held_out": order[len(order) * 2 // 3:],
        })
    return kernels


def score(model, kernels: list[dict], min_records: int) -> list[dict]:
    longest = max(len(k["train"]) for k in kernels)
    for start in range(0, longest, BATCH):
        for k in kernels:
            batch = k["train"][start:start + BATCH]
            if len(batch):
                model.update(k["context"], [k["candidates"][i] for i in batch], [k["results"][i] for i in batch])
    rows = []
    for k in kernels:
        if len(k["candidates"]) < min_records:
            continue
        held = k["held_out"]
        predicted = model.predict(k["context"], [k["candidates"][i] for i in held])
        speed = np.array([1.0 / np.median([float(s) for s in k["results"][i].run_secs]) for i in held])
        rho = spearmanr(predicted, speed).statistic
        rows.append({
            "kernel": k["label"], "blocks": k["blocks"], "records": len(k["candidates"]),
            "spearman": None if np.isnan(rho) else float(rho),
            "nonpositive": float(np.mean(predicted <= 0)),
            "top1_over_best": float(speed[np.argmax(predicted)] / speed.max()),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", default="schedules/x86", help="tuning log directory")
    parser.add_argument("--target", default="x86", help="target preset the log was tuned for")
    parser.add_argument("--min-records", type=int, default=48, help="report kernels with at least this many records")
    args = parser.parse_args()
    target = resolve_target(args.target).tvm_target()
    started = time.time()
    kernels = load_kernels(args.log, target)
    print(f"{len(kernels)} kernels, {sum(len(k['candidates']) for k in kernels)} records "
          f"({time.time() - started:.0f} s to extract features)")
    cores = physical_thread_count()
    models = {"TVM XGBModel": ms.cost_model.XGBModel(num_tuning_cores=cores), "autotune": make_cost_model(cores)}
    results = {name: score(model, kernels, args.min_records) for name, model in models.items()}

    def fmt(value):
        return "n/a" if value is None else f"{value:+.2f}"

    lines = [f"# Cost model replay: `python tools/cost_model_replay.py --log {args.log}`", "",
             f"{len(kernels)} kernels, {sum(len(k['candidates']) for k in kernels)} records; "
             "spearman / share of predictions <= 0 / measured speed of the top prediction over the best "
             "(held-out third of each kernel's records).", "",
             "| kernel (argument shapes) | blocks | records | " + " | ".join(f"{n}: spearman, <=0, top1/best" for n in results) + " |",
             "|---|---|---|" + "---|" * len(results)]
    for i, row in enumerate(next(iter(results.values()))):
        cells = [f"{fmt(r[i]['spearman'])}, {r[i]['nonpositive']:.2f}, {r[i]['top1_over_best']:.2f}" for r in results.values()]
        lines.append(f"| {row['kernel']} | {row['blocks']} | {row['records']} | " + " | ".join(cells) + " |")
    means = []
    for rows in results.values():
        rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
        means.append(f"{np.mean(rhos) if rhos else float('nan'):+.2f}, {np.mean([r['nonpositive'] for r in rows]):.2f}, "
                     f"{np.mean([r['top1_over_best'] for r in rows]):.2f}")
    lines.append("| **mean** | | | " + " | ".join(means) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost_model.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "cost_model.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'cost_model.md'}")


if __name__ == "__main__":
    main()
