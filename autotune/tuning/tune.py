"""Tune a Relax module with MetaSchedule and the XGBoost cost model, into a resumable log."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from autotune.frontend.importer import ImportedModel
from autotune.passes.pipeline import fuse_for_target, prepare_model, tuning_space
from autotune.support.errors import TuningFailed
from autotune.support.ir import is_scheduled
from autotune.support.package_data import shipped_log_dir
from autotune.support.settings import TuneSettings
from autotune.support.targets import TargetPreset, resolve_target
from autotune.support.threads import physical_thread_count
from autotune.support.tvm_compat import (
    cancel_queued_measurements,
    import_tensor_intrin_fast,
)

from .cost_model import make_cost_model
from .cpu_watch import CpuWatch
from .log import TuningLog, structure_key
from .remeasure import RemeasureReport, remeasure
from .scheduler import MeasuredInTurn
from .search import FallbackFirstSearch

log = logging.getLogger(__name__)


@dataclass
class TaskStats:
    name: str
    weight: float
    trials: int = 0
    failures: int = 0
    best_sec: float = math.inf


@dataclass
class TuneReport:
    tasks: list[TaskStats]
    trials: int
    failures: int
    records_before: int  # the log's records of the tuned kernels (the rest of the log is not read)
    records_after: int
    seconds: float
    log_dir: str
    first_error: str | None = None
    log_problems: list[str] = field(default_factory=list)
    seed_records: int = 0  # records of the shipped log the search started from
    disturbed: str | None = None  # CpuWatch's warning when other work shared the CPU during measurements
    remeasured: RemeasureReport | None = None  # the heavy kernels' best schedules measured again (remeasure.py)

    def estimated_latency_ms(self) -> float | None:
        """Sum over tuned tasks of weight × best time (untuned tasks are not counted)."""
        tuned = [t for t in self.tasks if math.isfinite(t.best_sec)]
        if not tuned:
            return None
        return 1e3 * sum(t.weight * t.best_sec for t in tuned)

    def warnings(self) -> list[str]:
        """What the user should know about the log and the measurements."""
        failed = self.remeasured.failures if self.remeasured else []
        return self.log_problems + ([self.disturbed] if self.disturbed else []) + [f"re-measuring: {f}" for f in failed]

    def summary(self) -> str:
        est = self.estimated_latency_ms()
        tuned = sum(1 for t in self.tasks if math.isfinite(t.best_sec))
        return (
            f"{self.trials} trials ({self.failures} failed) over {tuned}/{len(self.tasks)} tasks in "
            f"{self.seconds:.0f} s; log {self.log_dir}: {self.records_before} -> {self.records_after} records of these kernels"
            + (f" (+ {self.seed_records} shipped records it started from)" if self.seed_records else "")
            + (f"; tuned kernels sum to {est:.2f} ms" if est is not None else "")
            + (f"\n{self.remeasured.summary()}" if self.remeasured is not None else "")
        )


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    """Counts trials and failures per task and drives the progress display."""

    def __init__(self, stats: list[TaskStats], on_update, after_batch=None):
        super().__init__()
        self.stats = stats
        self.on_update = on_update
        self.after_batch = after_batch
        self.first_error: str | None = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        stat = self.stats[task_id]
        for built, ran in zip(builder_results, runner_results):
            stat.trials += 1
            error = built.error_msg or ran.error_msg
            if error:
                stat.failures += 1
                if self.first_error is None:
                    self.first_error = f"task {stat.name}: {error.strip()[:2000]}"
                continue
            secs = [float(s) for s in ran.run_secs]
            if secs:
                stat.best_sec = min(stat.best_sec, sum(secs) / len(secs))
        self.on_update()
        if self.after_batch is not None:
            self.after_batch()


def make_builder(settings: TuneSettings):
    from .workers import LEAN_BUILD, LINKED_EXPORT, initialize_worker

    with _startup_check("build", "--build-timeout", settings.build_timeout_s):
        return ms.builder.LocalBuilder(
            max_workers=settings.build_workers,
            timeout_sec=settings.build_timeout_s,
            f_build=LEAN_BUILD,
            f_export=LINKED_EXPORT,
            initializer=initialize_worker,
        )


@contextmanager
def _startup_check(kind: str, option: str, timeout_s: float):
    """MetaSchedule's local builder and runner check their worker process when made, under the
    candidates' timeout: a worker slower than that (a busy machine, a tiny timeout) raised a bare
    TimeoutError out of the constructor."""
    try:
        yield
    except TimeoutError:
        raise TuningFailed(
            f"the {kind} worker process did not answer its start-up check within {option} {timeout_s:g} s "
            f"(a busy machine, or a timeout shorter than starting a worker takes); give a longer {option}"
        ) from None


def close_runner(runner, drop_queued: bool) -> None:
    """Stop a local runner's measuring process now.

    MetaSchedule leaves this to garbage collection, whose shutdown waits for every queued
    measurement (a batch's candidates queue on the runner's one worker), and TVM's
    PopenPoolExecutor.shutdown warns that it can deadlock when called from __del__. After a
    Ctrl-C the queued measurements are dropped and the process killed instead.
    """
    pool = getattr(runner, "pool", None)  # RPC runners keep no local process
    if pool is None:
        return
    if drop_queued:
        cancel_queued_measurements(pool)
    pool.shutdown(wait=not drop_queued)


def make_runner(settings: TuneSettings, preset: TargetPreset):
    config = ms.runner.EvaluatorConfig(
        number=settings.runs_per_measurement,
        repeat=1,
        min_repeat_ms=settings.min_repeat_ms,
        enable_cpu_cache_flush=False,
    )
    if settings.rpc is not None:
        from .remote import make_rpc_runner

        return make_rpc_runner(settings, config)
    with _startup_check("measuring", "--run-timeout", settings.run_timeout_s):
        return ms.runner.LocalRunner(timeout_sec=settings.run_timeout_s, evaluator_config=config)


def extract_tasks(imported: ImportedModel, target) -> tuple[tvm.IRModule, list]:
    fused = fuse_for_target(imported.mod, target)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    # Kernels that arrive scheduled (the CUDA attention kernel) are not tasks.
    tasks = [t for t in tasks if not is_scheduled(t.dispatched[0]["main"])]
    return fused, tasks


def check_can_tune(preset: TargetPreset, settings: TuneSettings) -> None:
    """Refuse at once a local tuning run whose device this machine cannot measure on."""
    if settings.rpc is not None:
        return
    if preset.family == "arm":
        import platform

        if platform.machine() not in ("aarch64", "arm64"):
            raise TuningFailed(
                f"target '{preset.name}' is an ARM CPU and this machine is {platform.machine()}: tuning measures "
                "candidates on the device itself. Run `autotune rpc server --tracker HOST:9190 --key arm` on the board, a tracker "
                "here, and tune with --rpc HOST:PORT --key arm. Or build untuned/with a shipped log: "
                f"`autotune build --target {preset.name}`."
            )
    if preset.is_gpu:
        from autotune.support.targets import local_cuda_arch

        if local_cuda_arch() is None:
            raise TuningFailed(
                f"target '{preset.name}' needs a CUDA GPU to measure candidates, and none is usable here "
                "(no NVIDIA driver/device, or TVM's CUDA runtime did not load). Tune on a GPU machine, or "
                "measure remotely: start `autotune rpc tracker` and `autotune rpc server --key gpu` on the GPU "
                f"host, then `autotune tune --target {preset.name} --rpc HOST:PORT --key gpu`. Building needs "
                "no GPU: `autotune build --target ...` works here."
            )


def unit_tasks(units: list[tuple[ImportedModel, int]], preset: TargetPreset, quantize: str | None,
               winograd: bool = True) -> list:
    """The tuning tasks of compile units run `repeat` times each per call (a block-wise model: the
    block once per layer), prepared as build prepares them. A kernel that several units share is
    one task, weighted by all its calls."""
    target = preset.tvm_target()
    merged: dict = {}
    for unit, repeat in units:
        unit, _ = prepare_model(unit, preset, quantize, winograd)  # as build does: same kernels
        for task in extract_tasks(unit, target)[1]:
            key = structure_key(task.dispatched[0]["main"])
            weight = int(task.weight) * repeat + (int(merged[key].weight) if key in merged else 0)
            first = merged.get(key, task)
            merged[key] = ms.ExtractedTask(first.task_name, first.mod, target, list(first.dispatched), weight)
    return list(merged.values())


def tune(
    imported: ImportedModel | list[tuple[ImportedModel, int]],
    target: str | dict | TargetPreset,
    log_dir: str | Path,
    settings: TuneSettings | None = None,
    progress: bool = True,
) -> TuneReport:
    """Spend `settings.trials` new trials on the module's tasks, appending records to `log_dir`.

    `imported`: one module, or compile units with how often each runs per call (see `unit_tasks`).

    Records already in the log seed the search, so a second call resumes where the first
    stopped and spends only its own budget. Raises TuningFailed when every candidate failed.
    """
    settings = settings or TuneSettings()
    preset = resolve_target(target)
    check_can_tune(preset, settings)
    tvm_target = preset.tvm_target()
    units = imported if isinstance(imported, list) else [(imported, 1)]
    tasks = unit_tasks(units, preset, settings.quantize, settings.winograd)
    if not tasks:
        raise TuningFailed(f"{units[0][0].source}: no tunable tasks were found (the module has no operators?)")
    shipped = shipped_log_dir(preset.family) if settings.shipped_log else None
    database = TuningLog(
        log_dir, tvm_target, seed_log=shipped, kernels={structure_key(t.dispatched[0]["main"]) for t in tasks}
    )
    import_tensor_intrin_fast()  # the search's schedule rules import it; ~75 s otherwise
    records_before = database.report.good_lines
    seed_records = database.seed_records
    stats = [TaskStats(t.task_name, float(t.weight)) for t in tasks]
    light, heavy = split_by_flops(tasks, settings.light_task_share)
    recorded = {i for i, t in enumerate(tasks) if database.has_records(t.dispatched[0])}
    light = [i for i in light if i not in recorded]
    heavy = unrecorded_first(heavy, recorded)
    batch = settings.light_task_trials
    first = light[: (settings.trials // 2) // max(1, batch)]  # light kernels take at most half the budget
    rest = light[len(first):]
    heavy_trials = settings.trials - len(first) * batch
    per_task = settings.trials_per_task or max(settings.trials_per_iter, math.ceil(2 * heavy_trials / max(1, len(heavy))))

    def spent() -> int:
        return sum(s.trials for s in stats)

    phases = [  # each gives (task indices, trials, per-task cap, batch size) when its turn comes
        lambda: (first, len(first) * batch, batch, batch),
        lambda: (heavy, heavy_trials, per_task, settings.trials_per_iter),
        # heavy kernels whose search converged early leave budget: the light kernels not reached yet get it
        lambda: (rest, min(len(rest) * batch, settings.trials - spent()), batch, batch),
    ]
    display = _Display(stats, settings.trials, enabled=progress)
    callbacks = []
    started = time.time()
    guard = _InterruptGuard(on_first=display.note_stopping)
    watch = CpuWatch() if settings.rpc is None else None  # (remote measurements: this CPU does not matter)
    measured_elsewhere = settings.rpc is not None or preset.is_gpu  # building beside a measurement disturbs nothing

    def after_batch():
        if watch is not None:
            watch.lap()
        guard.check()

    with display, guard:
        for phase in phases:
            guard.check()
            indices, trials, cap, per_iter = phase()
            if not indices or trials <= 0:
                continue
            callback = _ProgressCallback([stats[i] for i in indices], display.update, after_batch=after_batch)
            callbacks.append(callback)
            # MetaSchedule prints its per-task table to stdout at INFO; keep the console for our
            # progress display, the full log goes to LOG/ms_logs/logs/. The call below creates its
            # console handler at this logger's level (and resets the logger to DEBUG): set it per call.
            logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [tasks[i] for i in indices],
                work_dir=str(Path(log_dir) / "ms_logs"),
                space=tuning_space(tvm_target),
                strategy=FallbackFirstSearch(),
                num_threads=physical_thread_count(),
                seed=settings.seed,
            )
            builder, runner = make_builder(settings), make_runner(settings, preset)
            cost_model = make_cost_model(num_tuning_cores=physical_thread_count())
            measure_callbacks = ms.measure_callback.MeasureCallback.create("default") + [callback]
            try:
                ms.tune_tasks(
                    tasks=contexts,
                    task_weights=weights,
                    work_dir=str(Path(log_dir) / "ms_logs"),
                    max_trials_global=trials,
                    max_trials_per_task=cap,
                    num_trials_per_iter=per_iter,
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=cost_model,
                    measure_callbacks=measure_callbacks,
                    task_scheduler=MeasuredInTurn(seed=settings.seed, overlap=measured_elsewhere),
                )
            finally:
                close_runner(runner, drop_queued=bool(guard.interrupted))
    remeasured = None
    if settings.remeasure_rounds > 0:
        remeasured = _remeasure(database, tasks, tvm_target, preset, settings, progress)
    first_error = next((c.first_error for c in callbacks if c.first_error), None)
    report = TuneReport(
        tasks=stats,
        trials=sum(s.trials for s in stats),
        failures=sum(s.failures for s in stats),
        records_before=records_before,
        records_after=records_before + database.committed,
        seconds=time.time() - started,
        log_dir=str(log_dir),
        first_error=first_error,
        log_problems=database.report.problem_summary(),
        seed_records=seed_records,
        disturbed=watch.warning() if watch is not None else None,
        remeasured=remeasured,
    )
    if report.trials > 0 and report.failures == report.trials:
        raise TuningFailed(
            f"all {report.trials} candidates failed to build or run; nothing was tuned. First failure:\n"
            f"{report.first_error}"
        )
    return report


def _remeasure(database: TuningLog, tasks: list, target, preset: TargetPreset, settings: TuneSettings, progress: bool):
    """The heavy kernels' best schedules measured again, interleaved (remeasure.py); Ctrl-C stops between kernels."""
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    builder, runner = make_builder(settings), make_runner(settings, preset)
    guard = _InterruptGuard()
    with guard:
        try:
            return remeasure(
                database, tasks, target, builder, runner, settings.remeasure_rounds, settings.remeasure_top,
                settings.remeasure_min_share, margin=settings.remeasure_margin, on_line=print if progress else log.info,
                check_interrupt=guard.check,
            )
        finally:
            close_runner(runner, drop_queued=bool(guard.interrupted))


def task_flops(task) -> float:
    """Floating-point operations of one call of the task's kernel, times its call count."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * float(task.weight)
    except Exception:  # a kernel the estimator cannot walk counts as heavy
        return math.inf


def unrecorded_first(indices: list[int], recorded: set[int]) -> list[int]:
    """The tasks without records first, each group in its order: MetaSchedule's scheduler starts
    with one batch per task in list order, so a resumed run with a small budget reaches the kernels
    an earlier run never measured before it re-searches the ones it did."""
    return [i for i in indices if i not in recorded] + [i for i in indices if i in recorded]


def split_by_flops(tasks: list, light_share: float) -> tuple[list[int], list[int]]:
    """Indices of (light, heavy) tasks: light ones do under `light_share` of the module's FLOPs.

    Tuning spends trials where the time is: a matmul of 40 GFLOP gains seconds from a better
    schedule, a reshape gains microseconds, yet MetaSchedule's scheduler would give each the same
    first batches. Light kernels get one small batch (enough to find a parallel, vectorised
    schedule), heavy ones share the rest of the budget.
    """
    flops = [task_flops(t) for t in tasks]
    total = sum(f for f in flops if math.isfinite(f))
    if total <= 0:
        return [], list(range(len(tasks)))
    light = [i for i, f in enumerate(flops) if f / total < light_share]
    heavy = [i for i, f in enumerate(flops) if f / total >= light_share]
    return light, heavy


class _InterruptGuard:
    """Ctrl-C stops tuning after the batch in flight; a second Ctrl-C stops at once.

    An exception raised by the signal handler at an arbitrary point can land in the middle of
    TVM's C++ (a constructor, a worker pool being torn down) and end in std::terminate. So the
    first SIGINT only sets a flag, and `check()`, called after each measured batch from the
    measure callback (a point where TVM expects Python errors), raises KeyboardInterrupt there:
    the batch's records are on disk by then. Errors that TVM wraps around it come back as
    KeyboardInterrupt too.
    """

    def __init__(self, on_first=None):
        self.interrupted: list[int] = []
        self._previous = None
        self._on_first = on_first
        self._first = threading.Event()

    def _on_sigint(self, signum, frame):
        # Bookkeeping only: a handler that prints can land inside a write (CPython raises
        # "reentrant call") or while rich's progress holds a lock its refresh thread waits on.
        self.interrupted.append(signum)
        if len(self.interrupted) > 1:
            raise KeyboardInterrupt
        self._first.set()

    def _announce(self) -> None:
        """Says that the first Ctrl-C was heard, from its own thread rather than the handler."""
        self._first.wait()
        if self.interrupted and self._on_first is not None:
            self._on_first()

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            threading.Thread(target=self._announce, name="autotune-ctrl-c", daemon=True).start()
        return self

    def __exit__(self, kind, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        self._first.set()  # lets the announcing thread end
        if exc is not None and self.interrupted and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        return False


class _Display:
    """A rich progress bar: trials, tasks touched, best kernel time sum so far. Where stdout is not a
    terminal (a log file, CI) rich draws nothing, so the same line is logged every LOG_EVERY_S."""

    LOG_EVERY_S = 30.0

    def __init__(self, stats: list[TaskStats], total: int, enabled: bool):
        self.stats = stats
        self.total = total
        self.enabled = enabled
        self._progress = None
        self._last_logged, self._last_trials = time.monotonic(), 0

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]tuning"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("tune", total=self.total, detail="")
        return self

    def note_stopping(self):
        message = "Ctrl-C: stopping after the batch in flight (its records are kept); Ctrl-C again to stop now"
        log.warning(message)

    def update(self):
        if self._progress is None:
            return
        trials = sum(s.trials for s in self.stats)
        touched = sum(1 for s in self.stats if s.trials)
        failed = sum(s.failures for s in self.stats)
        tuned = [s for s in self.stats if math.isfinite(s.best_sec)]
        est = sum(s.weight * s.best_sec for s in tuned) * 1e3
        detail = f"tasks {touched}/{len(self.stats)}  failed {failed}  tuned kernels {est:.2f} ms"
        self._progress.update(self._task, completed=min(trials, self.total), detail=detail)
        now = time.monotonic()
        if not self._progress.console.is_terminal and now - self._last_logged >= self.LOG_EVERY_S and trials != self._last_trials:
            self._last_logged, self._last_trials = now, trials
            log.info("tuning: %d/%d trials  %s", min(trials, self.total), self.total, detail)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
