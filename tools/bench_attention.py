"""Fused attention (issue 9) against torch SDPA and ONNX Runtime, same threads, interleaved.

    python tools/bench_attention.py                       # 12 heads x {1024, 1560} tokens x d128
    python tools/bench_attention.py --trials 32           # also a MetaSchedule-tuned TVM build
    python tools/bench_attention.py --tokens 1024 --rounds 15

Contenders, all fp32 on `--threads` (default 2) threads:
  tvm-fused      torch SDPA module imported by autotune (torch.export), `fuse_attention` rewrite,
                 untuned: the attention kernel gets its default schedule, the few reshape/transpose
                 kernels around it the generic fallback. This is what `autotune build` produces.
  tvm-kernel     the attention PrimFunc alone (no layout kernels around it), default schedule.
  tvm-tuned      as tvm-fused, the attention kernel tuned by MetaSchedule for --trials trials
                 (its custom rule: register-tile sizes as sampled decisions).
  torch-sdpa     torch.nn.functional.scaled_dot_product_attention (its CPU flash kernel).
  onnxruntime    the same module exported with the dynamo exporter (opset 18), ORT CPU EP.
On a CPU with AVX512-BF16, at bf16 (inputs rounded to bf16, bf16 output):
  tvm-kernel-bf16   the kernel alone with both GEMMs on vdpbf16ps, default schedule.
  tvm-kernel-amx    (a CPU with AMX-BF16) the kernel alone with both GEMMs on AMX tiles.
  tvm-kernel-int8qk (a CPU with VNNI too) the kernel w8a8 builds use: Q.K^T on vpdpbusd with Q and
                    K quantized to int8 in the kernel, P.V on vdpbf16ps.
  torch-sdpa-bf16   torch's SDPA on bf16 tensors.
Rounds are interleaved (round r runs every contender once, in turn), so load from other
processes on this shared machine hits all of them alike; a pause between calls lets the thread
pools that spin after a call (ORT, OpenMP, TVM) go idle before the next contender runs.
Medians and min are reported, and the ratio of medians to torch SDPA. Writes
tools/results/attention.md and attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 1560])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials for tvm-tuned (0: skip)")
    p.add_argument("--pause", type=float, default=0.3, help="seconds between two timed calls (thread pools spin after a call)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "attention")
    return p.parse_args()


ARGS = _parse()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before tvm is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmark this checkout's autotune

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from autotune.frontend.importer import from_torch  # noqa: E402
from autotune.kernels import attention_cpu as kc  # noqa: E402
from autotune.passes.attention import (  # noqa: E402
    fuse_attention,
    is_attention_kernel,
    schedule_attention,
)
from autotune.passes.pipeline import finalize_passes, fuse_for_target
from autotune.support import hardware  # noqa: E402
from autotune.support.ir import prim_funcs  # noqa: E402
from autotune.support.targets import resolve_target  # noqa: E402
from autotune.support.tvm_compat import import_tensor_intrin_fast  # noqa: E402,F401


class SDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def target():
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": ARGS.threads})


def build_module(imported, database=None):
    """The autotune build flow with the attention hooks; returns (callable, attention kernels)."""
    from autotune.build.fallback import schedule_untuned

    tgt = target()
    fused = fuse_for_target(fuse_attention(imported.mod, tgt), tgt)
    if database is not None:
        with tgt, database, tvm.transform.PassContext(opt_level=3):
            fused = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
    fused, _ = schedule_attention(fused, tgt)
    fused, _ = schedule_untuned(fused, tgt)
    with tgt:
        lowered = tvm.transform.Sequential(finalize_passes(tgt))(fused)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=tgt, relax_pipeline=None), tvm.cpu())
    main = vm["main"]
    kernels = {n: f for n, f in prim_funcs(fused).items() if is_attention_kernel(f)}
    return main, kernels


def tune_kernel(imported, trials: int, work_dir: str):
    from tvm.s_tir import meta_schedule as ms

    from autotune.support.settings import TuneSettings
    from autotune.tuning.tune import make_builder, make_runner

    preset = resolve_target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": ARGS.threads})
    tgt = target()
    fused = fuse_for_target(fuse_attention(imported.mod, tgt), tgt)
    name, func = next((n, f) for n, f in prim_funcs(fused).items() if is_attention_kernel(f))
    settings = TuneSettings(trials=trials, trials_per_iter=8, run_timeout_s=30)
    mod = tvm.IRModule({"main": func})
    started = time.time()
    database = ms.tune_tir(
        mod, tgt, work_dir=work_dir, max_trials_global=trials, num_trials_per_iter=8,
        builder=make_builder(settings), runner=make_runner(settings, preset),
        cost_model=ms.cost_model.XGBModel(num_tuning_cores=ARGS.threads), num_tuning_cores=ARGS.threads,
    )
    records = database.get_all_tuning_records()
    best = min((float(np.mean([float(s) for s in r.run_secs])) for r in records if r.run_secs), default=None)
    measured = [r for r in records if r.run_secs]
    decisions = None
    if measured:
        top = min(measured, key=lambda r: float(np.mean([float(s) for s in r.run_secs])))
        decisions = [int(v) for v in top.trace.decisions.values()]
    return database, {"trials": len(records), "seconds": round(time.time() - started, 1), "best_kernel_ms": best and best * 1e3, "decisions": decisions}


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ARGS.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_shape(tokens: int, workdir: Path) -> dict:
    h, d = ARGS.heads, ARGS.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, tokens, d) for _ in range(3))
    with torch.no_grad():
        ref = SDPA()(q, k, v).numpy()
    imported = from_torch(SDPA(), {"q": q, "k": k, "v": v})
    weights = [tvm.runtime.tensor(w) for w in imported.weights.values()]
    tq, tk, tv = (tvm.runtime.tensor(x.numpy()) for x in (q, k, v))

    contenders, info = {}, {}
    started = time.time()
    main, kernels = build_module(imported)
    info["build_s"] = round(time.time() - started, 1)
    (kname, kfunc), = kernels.items()
    info["kernel"] = {"name": kname, **{k: int(x) for k, x in kfunc.attrs["autotune.attention"].items() if k != "scale"}}
    contenders["tvm-fused"] = lambda: main(tq, tk, tv, *weights)

    # The kernel alone: Q, K^T, V as the rewrite hands them to it.
    tgt = target()
    a = kfunc.attrs["autotune.attention"]
    tiles = kc.CpuTiles(int(a["tq"]), int(a["tk"]), int(a["lanes"]))
    kernel = kc.compile_standalone(h, tokens, tokens, d, d, tgt, tiles=tiles)["main"]
    kq = tvm.runtime.tensor(q.numpy()[0])
    kkt = tvm.runtime.tensor(np.ascontiguousarray(k.numpy()[0].transpose(0, 2, 1)))
    kv = tvm.runtime.tensor(v.numpy()[0])
    kout = tvm.runtime.tensor(np.zeros((h, tokens, d), np.float32))
    contenders["tvm-kernel"] = lambda: kernel(kq, kkt, kv, kout)

    if ARGS.trials:
        database, info["tuning"] = tune_kernel(imported, ARGS.trials, str(workdir / f"ms_{tokens}"))
        tuned_main, _ = build_module(imported, database)
        contenders["tvm-tuned"] = lambda: tuned_main(tq, tk, tv, *weights)

    contenders["torch-sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)

    bf16_outputs = {}  # bf16 kernels' output tensors, by contender
    if "avx512_bf16" in hardware.cpu_flags():  # bf16: the vdpbf16ps kernel against torch's bf16 SDPA
        import ml_dtypes

        t16 = kc.choose_tiles(tokens, tokens, d, d, 16)
        kernel16 = kc.compile_standalone(h, tokens, tokens, d, d, tgt, None, "bfloat16", t16, engine="avx512bf16")["main"]
        bq, bkt, bv = (tvm.runtime.tensor(np.ascontiguousarray(x).astype(ml_dtypes.bfloat16))
                       for x in (q.numpy()[0], k.numpy()[0].transpose(0, 2, 1), v.numpy()[0]))
        bout = tvm.runtime.empty((h, tokens, d), "bfloat16")
        contenders["tvm-kernel-bf16"] = lambda: kernel16(bq, bkt, bv, bout)
        bf16_outputs["tvm-kernel-bf16"] = bout
        if "avx512_vnni" in hardware.cpu_flags():  # int8 scores: Q.K^T on vpdpbusd
            kernel8 = kc.compile_standalone(h, tokens, tokens, d, d, tgt, None, "bfloat16", t16, engine="avx512vnni")["main"]
            iout = tvm.runtime.empty((h, tokens, d), "bfloat16")
            contenders["tvm-kernel-int8qk"] = lambda: kernel8(bq, bkt, bv, iout)
            bf16_outputs["tvm-kernel-int8qk"] = iout
        if not hardware.missing_cpu_flags(["amx_tile", "amx_bf16"]):  # both GEMMs on AMX tiles
            hardware.request_amx_permission()
            amx = resolve_target("x86-amx").tvm_target()
            kernel_amx = kc.compile_standalone(h, tokens, tokens, d, d, amx, None, "bfloat16",
                                               kc.choose_amx_tiles(tokens, tokens), engine="amx")["main"]
            aout = tvm.runtime.empty((h, tokens, d), "bfloat16")
            contenders["tvm-kernel-amx"] = lambda: kernel_amx(bq, bkt, bv, aout)
            bf16_outputs["tvm-kernel-amx"] = aout
        qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
        contenders["torch-sdpa-bf16"] = lambda: F.scaled_dot_product_attention(qb, kb, vb)

    onnx_path = workdir / f"sdpa_{tokens}.onnx"
    torch.onnx.export(SDPA().eval(), (q, k, v), str(onnx_path), dynamo=True, opset_version=18, input_names=["q", "k", "v"])
    sess = ort_session(onnx_path)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    contenders["onnxruntime"] = lambda: sess.run(None, feeds)

    # Correctness of every contender against torch.
    errors = {}
    for name, fn in contenders.items():
        out = fn()
        if name in bf16_outputs:  # (the standalone kernels write into their output tensor)
            out = bf16_outputs[name].numpy().astype(np.float32)[None]
        elif name.startswith("tvm") and name != "tvm-kernel":
            out = out.numpy()
        elif name == "tvm-kernel":
            out = kout.numpy()[None]
        elif name == "torch-sdpa-bf16":
            out = out.float().numpy()
        elif name == "onnxruntime":
            out = out[0]
        else:
            out = out.numpy()
        errors[name] = float(np.abs(np.asarray(out, np.float64) - ref).max())

    for fn in contenders.values():  # warm-up
        fn()
    times = {name: [] for name in contenders}
    load = []
    with torch.no_grad():
        for _ in range(ARGS.rounds):
            load.append(os.getloadavg()[0])
            for name, fn in contenders.items():
                time.sleep(ARGS.pause)  # let the previous contender's spinning pool threads go idle
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    flops = 4 * h * tokens * tokens * d
    base = statistics.median(times["torch-sdpa"])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {
            "median_ms": round(med * 1e3, 2),
            "min_ms": round(min(ts) * 1e3, 2),
            "gflops_median": round(flops / med / 1e9, 1),
            "ratio_to_torch_sdpa": round(med / base, 3),
            "max_abs_err_vs_torch": errors[name],
        }
    return {"tokens": tokens, "heads": h, "head_dim": d, "flops": flops, "results": rows, "load_avg": [min(load), max(load)], **info}


def write(report: dict) -> None:
    out = ARGS.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Fused attention vs torch SDPA vs ONNX Runtime",
        "",
        f"`python tools/bench_attention.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"{report['machine']}; {ARGS.threads} threads everywhere (TVM_NUM_THREADS, torch.set_num_threads, ORT "
        f"intra_op_num_threads); fp32 (bf16 rows: bf16 inputs and output, on CPUs with AVX512-BF16); {ARGS.rounds} interleaved rounds, {ARGS.pause} s pause between calls; median (min) ms. Ratio = median / "
        "median of torch SDPA (< 1: faster than torch). The machine is shared: load average per shape below.",
        "",
    ]
    for shape in report["shapes"]:
        lines += [
            f"## {shape['heads']} heads x {shape['tokens']} tokens x d{shape['head_dim']} "
            f"({shape['flops'] / 1e9:.2f} GFLOP; load average {shape['load_avg'][0]:.1f}-{shape['load_avg'][1]:.1f})",
            "",
            "| contender | median ms | min ms | GFLOP/s (median) | ratio to torch SDPA | max abs err vs torch |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in shape["results"].items():
            lines.append(
                f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['gflops_median']:.0f} | "
                f"{r['ratio_to_torch_sdpa']:.2f} | {r['max_abs_err_vs_torch']:.1e} |"
            )
        k = shape["kernel"]
        lines += ["", f"Kernel `{k['name']}`: query tile {k['tq']}, key tile {k['tk']}, {k['lanes']} lanes, "
                  f"padding q/k {k['pad_q']}/{k['pad_k']}; build {shape['build_s']} s."]
        if "tuning" in shape:
            t = shape["tuning"]
            lines.append(f"Tuning: {t['trials']} trials in {t['seconds']} s, best kernel {t['best_kernel_ms']:.1f} ms "
                         f"(decisions {t['decisions']}).")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    import_tensor_intrin_fast()
    with tempfile.TemporaryDirectory() as tmp:
        shapes = [bench_shape(n, Path(tmp)) for n in ARGS.tokens]
    import onnxruntime

    report = {
        "machine": f"{platform.processor() or platform.machine()} ({tvm.target.codegen.llvm_get_system_cpu()}), "
        f"{os.cpu_count()} CPUs; tvm {tvm.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
        "threads": ARGS.threads,
        "rounds": ARGS.rounds,
        "shapes": shapes,
    }
    write(report)


if __name__ == "__main__":
    main()
