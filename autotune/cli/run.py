"""`autotune run`."""

from __future__ import annotations

from autotune.support import defaults


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="load an artifact, run it once on inputs, time it")
    p.add_argument("artifact", help="the artifact's .so (its .weights.safetensors and .json beside it)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--inputs", help=".npz file with one array per input name (default: random inputs)")
    p.add_argument("--save", help="save the outputs to this .npz file")
    p.add_argument("--repeat", type=int, default=defaults.RUN_REPEAT, help=f"timed runs (default {defaults.RUN_REPEAT})")
    p.add_argument("--check-finite", action="store_true", help="reject inputs containing NaN or Inf")
    p.add_argument("--profile", type=int, nargs="?", const=defaults.PROFILE_TOP, metavar="N",
                   help=f"also time each kernel and print the N slowest (default {defaults.PROFILE_TOP}) with GFLOP/s")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from autotune.runtime.loader import load

    module = load(args.artifact, device=args.device, check_finite=args.check_finite)
    print(module)
    if args.inputs:
        with np.load(args.inputs) as data:
            inputs = {k: data[k] for k in data.files}
    else:
        inputs = module.random_inputs()
    outputs = module(**inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for spec, out in zip(module.outputs, outputs):
        print(f"{spec.name}: {out.dtype}{list(out.shape)} mean {float(np.mean(out)):.6g} std {float(np.std(out)):.6g}")
    if args.save:
        np.savez(args.save, **{s.name: o for s, o in zip(module.outputs, outputs)})
        print(f"outputs saved to {args.save}")
    timing = module.benchmark(inputs, repeat=args.repeat)
    print(f"latency: median {timing['median_ms']:.3f} ms (min {timing['min_ms']:.3f}, max {timing['max_ms']:.3f}) over {args.repeat} runs")
    if args.profile:
        print(module.profile(inputs, repeat=max(1, min(args.repeat, 5))).format(top=args.profile))
    return 0
