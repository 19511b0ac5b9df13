"""Tuning logs survive bad data, interruption and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune.support.targets import resolve_target
from autotune.tuning.log import RECORDS_FILE, WORKLOADS_FILE, TuningLog, read_log

X86 = resolve_target("x86").tvm_target()


def _copy_log(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_lines(log: Path) -> list[str]:
    return (log / RECORDS_FILE).read_text().splitlines()


def test_real_log_reads_back_every_record(real_log):
    log = real_log
    report, workloads = read_log(log, X86)
    assert report.problems == []
    # (a re-measured schedule's line replaces its earlier lines: those are superseded, not lost)
    assert report.good_lines == len(_record_lines(log)) > 0
    assert report.workloads == len(workloads) > 0


def _corrupt_and_read(real_log, tmp_path, mutate):
    log = _copy_log(real_log, tmp_path / "log")
    good = read_log(log, X86)[0].records
    expected_problem = mutate(log)
    before = _digest(log / RECORDS_FILE), _digest(log / WORKLOADS_FILE)
    report, _ = read_log(log, X86)
    after = _digest(log / RECORDS_FILE), _digest(log / WORKLOADS_FILE)
    assert before == after, "reading must never rewrite the user's log"
    return good, report, expected_problem


def test_truncated_last_line(real_log, tmp_path):
    def mutate(log):
        path = log / RECORDS_FILE
        data = path.read_bytes()
        path.write_bytes(data + data.splitlines()[0][:57])  # a record cut mid-line, as a SIGKILL leaves it
        return len(data.splitlines()) + 1

    good, report, line = _corrupt_and_read(real_log, tmp_path, mutate)
    assert report.records == good
    [problem] = report.problems
    assert problem.line == line and problem.path.endswith(RECORDS_FILE)
    assert "truncated or corrupt" in problem.reason
    # a resumed run appends after the cut line, on a line of its own: its record reads back whole
    from tvm.s_tir import meta_schedule as ms

    memory = ms.database.MemoryDatabase()
    read_log(real_log, X86, memory)
    record = memory.get_all_tuning_records()[0]
    resumed = TuningLog(tmp_path / "log", X86)
    workload = resumed.commit_workload(record.workload.mod)
    resumed.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info))
    again, _ = read_log(tmp_path / "log", X86)
    assert again.records == good + 1 and [p.line for p in again.problems] == [line]


def test_garbage_line_in_the_middle(real_log, tmp_path):
    def mutate(log):
        path = log / RECORDS_FILE
        lines = path.read_bytes().splitlines(keepends=True)
        lines.insert(1, b"\x00\xffnot json at all\n")
        path.write_bytes(b"".join(lines))
        return 2

    good, report, line = _corrupt_and_read(real_log, tmp_path, mutate)
    assert report.records == good
    assert [p.line for p in report.problems] == [line]


def _append_edited_record(log: Path, edit) -> int:
    path = log / RECORDS_FILE
    lines = path.read_text().splitlines()
    obj = json.loads(lines[0])
    edit(obj)
    path.write_text("\n".join(lines + [json.dumps(obj)]) + "\n")
    return len(lines) + 1


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda o: o.update(id="feedfacefeedfacefeedface"), "unknown workload"),
        (lambda o: o.update(tvm="0.18.0"), "record from TVM 0.18.0"),
        (lambda o: o.update(target=json.dumps({"kind": "cuda", "arch": "sm_90"})), "another target"),
        (lambda o: o.update(record=["not", "a", "record"]), "not a tuning record"),
        # a re-measurement line is keyed by its trace before any replay: a malformed one crashed the read
        (lambda o: o.update(record=["not", "a", "record"], remeasured={"at": 1e12, "won": True}), "not a tuning record"),
    ],
)
def test_bad_records_are_reported_with_line_and_skipped(real_log, tmp_path, edit, reason):
    good, report, line = _corrupt_and_read(real_log, tmp_path, lambda log: _append_edited_record(log, edit))
    assert report.records == good
    [problem] = report.problems
    assert problem.line == line and reason in problem.reason
    assert f"{RECORDS_FILE}:{line}:" in str(problem)


def test_a_log_from_another_target_loads_nothing_for_this_one(real_log):
    """The log was tuned for the host ("x86"); a preset of another vector width is another target."""
    from autotune.tuning.log import schedule_isa

    host = schedule_isa(resolve_target("x86").tvm_target())
    other = resolve_target("x86-avx2" if host.vector == "avx512" else "x86-avx512").tvm_target()
    assert schedule_isa(other).vector != host.vector
    report, _ = read_log(real_log, other)
    assert report.records == 0
    assert len(report.problems) == len(_record_lines(real_log))
    assert all("another target" in p.reason for p in report.problems)
    # one line for a person; none where other CPUs' records are expected (the shipped log, in a build)
    assert [line for line in report.problem_summary() if "for other targets skipped" in line] == [
        f"{len(report.problems)} records for other targets skipped (`autotune inspect LOG` lists them)"]
    assert report.problem_summary(other_targets=False) == []


_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["truncate", "flip", "duplicate", "garbage", "delete"]),
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_MUTATIONS)
def test_fuzz_reader_never_crashes_and_keeps_untouched_records(real_log, tmp_path_factory, mutations):
    src = real_log
    log = _copy_log(src, tmp_path_factory.mktemp("fuzz"))
    lines = (log / RECORDS_FILE).read_bytes().splitlines(keepends=True)
    touched: set[int] = set()
    for kind, where, byte in mutations:
        i = where % len(lines)
        if kind == "truncate":
            # a line cut short; a cut inside the file keeps its newline (our writer appends whole
            # lines, so only the last line can lose it, as a crash mid-write leaves it)
            ending = b"\n" if lines[i].endswith(b"\n") and i < len(lines) - 1 else b""
            lines[i] = lines[i][: where % max(1, len(lines[i]))].rstrip(b"\n") + ending
        elif kind == "flip":
            pos = where % len(lines[i])
            if lines[i][pos : pos + 1] == b"\n":  # the line runs into the next one: both are touched
                touched.add(i + 1)
            lines[i] = lines[i][:pos] + bytes([lines[i][pos] ^ (byte or 1)]) + lines[i][pos + 1 :]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
            touched = {t + 1 if t >= i else t for t in touched}
            if i + 1 in touched:  # a copy of a damaged line is damaged
                touched.add(i)
            continue  # a duplicate of a good record is a good record twice
        elif kind == "garbage":
            lines.insert(i, bytes([byte]) * (where % 50 + 1) + b"\n")
            touched = {t + 1 if t >= i else t for t in touched}
            touched.add(i)
            continue
        elif kind == "delete":
            del lines[i]
            touched = {t - 1 if t > i else t for t in touched if t != i}
            if not lines:
                lines = [b"\n"]
            continue
        touched.add(i)
    (log / RECORDS_FILE).write_bytes(b"".join(lines))
    untouched = sum(1 for i, line in enumerate(lines) if i not in touched and line.strip())
    report, _ = read_log(log, X86)  # must not raise
    assert report.good_lines >= untouched, "a good record was lost"


def test_concurrent_writers_do_not_interleave_or_lose_records(real_log, tmp_path):
    """Two processes commit the same real records into one directory at the same time."""
    shared = tmp_path / "shared"
    writer = f"""
        import sys, autotune
        from autotune.support.targets import resolve_target
        from autotune.tuning.log import TuningLog, read_log
        from tvm.s_tir import meta_schedule as ms
        target = resolve_target("x86").tvm_target()
        memory = ms.database.MemoryDatabase()
        read_log({str(real_log)!r}, target, memory)
        records = memory.get_all_tuning_records()
        out = TuningLog({str(shared)!r}, target)
        for _ in range(10):
            for record in records:
                workload = out.commit_workload(record.workload.mod)
                out.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info))
        print(out.committed)
    """
    import textwrap

    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    committed = 0
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        committed += int(out.strip().splitlines()[-1])
    report, _ = read_log(shared, X86)
    assert report.problems == []
    assert report.records == committed == len(_record_lines(shared))


def _start_tune(log: Path, trials: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autotune.cli.main", "tune", "--model", "wan-i2v-tiny", "--component", "image_encoder",
         "--log", str(log), "--trials", str(trials), "--trials-per-iter", "4",
         "--remeasure-rounds", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _wait_for_records(log: Path, count: int, proc: subprocess.Popen, timeout: float = 400) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = log / RECORDS_FILE
        if path.exists():
            n = sum(1 for line in path.read_bytes().splitlines() if line.strip())
            if n >= count:
                return n
        assert proc.poll() is None, f"tune ended before writing {count} records: {proc.communicate()[1][-2000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {count} records after {timeout} s")


def test_interrupted_tune_keeps_its_records(tmp_path):
    """Ctrl-C (SIGINT) and a crash (SIGKILL), each in the middle of its own run (the two run side by
    side): every record flushed before the signal is in the log, at most a cut last line not."""
    # Without the shipped log the light kernels are not covered, so the run starts with one light
    # kernel's batch: its record is on disk ~20 s in, while the heavy kernels still have a minute of
    # work ahead. The signal lands in the middle of a run.
    signals = {"sigint": signal.SIGINT, "sigkill": signal.SIGKILL}
    procs = {name: _start_tune(tmp_path / name, 16, "--no-shipped-log") for name in signals}
    try:
        for name, sig in signals.items():
            seen = _wait_for_records(tmp_path / name, 1, procs[name])
            procs[name].send_signal(sig)
            _, err = procs[name].communicate(timeout=120)
            assert procs[name].returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err[-2000:]
            report, _ = read_log(tmp_path / name, X86)
            assert report.records >= seen, f"{name}: records flushed before the signal were lost"
            assert all("truncated" in p.reason for p in report.problems)  # at most a cut last line
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # resuming from such a log: test_truncated_last_line (the append) and test_spine (the tune)


def test_a_tuning_run_reads_only_its_kernels_and_files_no_workload_twice(real_log, tmp_path):
    """A tune reads its own kernels' records (a large log's others cost minutes to replay), and a
    kernel it passed over is not filed a second time when it commits a record for it."""
    from tvm.s_tir import meta_schedule as ms

    from autotune.tuning.log import structure_key

    log = _copy_log(real_log, tmp_path / "log")
    memory = ms.database.MemoryDatabase()
    whole = read_log(log, X86, memory)[0]
    by_kernel = {structure_key(r.workload.mod["main"]): r for r in memory.get_all_tuning_records()}
    assert len(by_kernel) >= 2
    wanted, other = list(by_kernel)[:2]
    tuning_log = TuningLog(log, X86, kernels={wanted})
    assert tuning_log.has_records(by_kernel[wanted].workload.mod)
    assert not tuning_log.has_workload(by_kernel[other].workload.mod)
    assert 0 < tuning_log.report.good_lines < whole.good_lines
    workloads_before = (log / WORKLOADS_FILE).read_bytes()
    record = by_kernel[other]
    workload = tuning_log.commit_workload(record.workload.mod)
    tuning_log.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info))
    assert (log / WORKLOADS_FILE).read_bytes() == workloads_before, "a workload on disk was filed again"
    again = read_log(log, X86)[0]
    assert again.problems == [] and again.good_lines == whole.good_lines + 1


def test_ctrl_c_drops_queued_measurements_instead_of_waiting_for_them():
    # A batch's candidates queue on the runner's one worker (MetaSchedule's own scheduler queued
    # every kernel's first batch); garbage collection would run them all before the process could exit.
    from autotune.support.settings import TuneSettings
    from autotune.tuning.tune import close_runner, make_runner

    runner = make_runner(TuneSettings(), resolve_target("x86"))
    queued = [runner.pool.submit(time.sleep, 5) for _ in range(6)]  # 30 s of work, one worker
    started = time.time()
    close_runner(runner, drop_queued=True)
    assert time.time() - started < 3
    assert sum(f.cancelled() for f in queued) >= 4, "queued measurements still run"
    with pytest.raises(Exception):
        queued[0].result(timeout=3)  # the one in flight: its process was killed, not waited for


def test_merge_copies_what_is_missing_once_and_skips_bad_lines(real_log, tuned_mlp, tmp_path):
    from autotune.tuning.log import merge_log

    src = _copy_log(real_log, tmp_path / "src")
    with open(src / RECORDS_FILE, "a") as f:
        f.write('{"id": "truncated rec\n')
    read = read_log(src, X86)[0]
    total = read.good_lines  # lines copied as they are
    first = merge_log(src, tmp_path / "dst")
    assert first.records_added == total and 0 < first.workloads_added <= read_log(src)[0].workloads  # those with records
    assert [p.line for p in first.problems] == [len(_record_lines(src))]
    again = merge_log(src, tmp_path / "dst")
    assert again.records_added == 0 and again.records_present == total
    merged, _ = read_log(tmp_path / "dst", X86)
    assert (merged.records, merged.superseded, merged.problems) == (read.records, read.superseded, [])
    # and a merged log builds like the original: its records apply to the same kernels
    from autotune.build.compile import build

    built = build(tuned_mlp[0], "x86", tmp_path / "m.so", log_dir=tmp_path / "dst")
    assert built.tuned_kernels >= 1


def _records_in_memory(log: Path) -> list:
    from autotune.tuning.log import record_key

    return sorted((record_key(r), [float(t) for t in r.run_secs]) for r in TuningLog(log, X86).get_all_tuning_records())


def test_compacting_moves_every_line_whole_and_appends_go_on(real_log, tmp_path):
    from conftest import run_cli
    from tvm.s_tir import meta_schedule as ms

    from autotune.tuning.log import COMPACTED, compact_log, log_digest

    log = _copy_log(real_log, tmp_path / "log")
    with open(log / RECORDS_FILE, "a") as f:
        f.write('{"id": "cut short by a crash')  # no newline
    before, memory = read_log(log, X86)[0], _records_in_memory(log)
    assert [p.reason[:14] for p in before.problems] == ["not valid JSON"]

    lines = len(_record_lines(log))  # (the cut line too)
    result = run_cli("compact", "--log", str(log))  # (a process of its own: the CLI sets up the library's logging)
    assert result.returncode == 0 and f"{RECORDS_FILE}: {lines} lines" in result.stdout, (result.stdout, result.stderr)
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        assert (log / name).read_bytes() == b"" and (log / (name + COMPACTED)).stat().st_size > 0
    after = read_log(log, X86)[0]
    assert (after.records, after.superseded, after.workloads) == (before.records, before.superseded, before.workloads)
    assert [(Path(p.path).name, p.line, p.reason[:14]) for p in after.problems] == [
        (RECORDS_FILE + COMPACTED, before.problems[0].line, "not valid JSON")]
    assert _records_in_memory(log) == memory
    # the workloads are known: a tuning run appends only its new record, and compacting again keeps
    # the cut line one line, apart from the record after it
    digest = log_digest(log)
    tuning_log = TuningLog(log, X86)
    record = tuning_log.get_all_tuning_records()[0]
    workload = tuning_log.commit_workload(record.workload.mod)
    tuning_log.commit_tuning_record(ms.database.TuningRecord(
        record.trace, workload, [1.0], record.target, record.args_info))
    assert (log / WORKLOADS_FILE).read_bytes() == b"" and len(_record_lines(log)) == 1
    assert log_digest(log) != digest
    compact_log(log)
    again = read_log(log, X86)[0]
    assert (again.good_lines, len(again.problems)) == (before.good_lines + 1, 1)


def test_a_damaged_compacted_part_is_reported_and_the_lines_before_it_and_after_it_read(real_log, tmp_path):
    from autotune.tuning.log import COMPACTED, compact_log

    log = _copy_log(real_log, tmp_path / "log")
    whole = read_log(log, X86)[0]
    compact_log(log)
    compacted = log / (RECORDS_FILE + COMPACTED)
    compacted.write_bytes(compacted.read_bytes()[: compacted.stat().st_size // 2])  # cut in the middle
    (log / RECORDS_FILE).write_text(_copy_log(real_log, tmp_path / "again").joinpath(RECORDS_FILE).read_text())
    report = read_log(log, X86)[0]
    [problem] = report.problems
    assert problem.path.endswith(RECORDS_FILE + COMPACTED) and "compressed data unreadable" in problem.reason
    assert whole.good_lines <= report.good_lines < 2 * whole.good_lines  # the plain file whole, some of the cut part


def _named_kernel(block: str):
    from tvm import te

    a = te.placeholder((64, 64), name="a")
    k = te.reduce_axis((0, 64), name="k")
    b = te.compute((64,), lambda i: te.sum(a[i, k] * 2.0, axis=k), name=block)
    return tvm.IRModule({"main": te.create_prim_func([a, b])})


def test_a_record_applies_to_its_twin_kernel_with_other_block_names(tmp_path):
    """Two models can hold the same kernel with differently named blocks. MetaSchedule pools
    them (structural equality ignores names), so a record read back for one must replay on the
    other: its trace's block names are mapped over."""
    from tvm.s_tir import meta_schedule as ms

    first, second = _named_kernel("first_name"), _named_kernel("second_name")
    log = TuningLog(tmp_path, X86)
    log.commit_workload(first)  # the twin the database will know first
    workload = log.commit_workload(second)
    sch = tvm.s_tir.Schedule(second)
    i, k = sch.get_loops(sch.get_sblock("second_name"))
    _, inner = sch.split(k, factors=[None, 8])
    sch.rfactor(inner, factor_axis=0)  # creates block "second_name_rf", which the trace then names
    sch.parallel(sch.get_loops(sch.get_sblock("second_name_rf"))[0])
    args = ms.arg_info.ArgInfo.from_prim_func(second["main"])
    log.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-4], X86, args))

    reread = TuningLog(tmp_path, X86)
    assert reread.report.problems == [] and reread.report.records == 1
    applied = reread.query_ir_module(second, X86, "main")
    assert applied is not None and "T.parallel" in applied.script()


def test_progress_is_logged_where_stdout_is_not_a_terminal(caplog, monkeypatch):
    # pytest captures stdout: rich sees no terminal and draws nothing, so the line must be logged
    from autotune.tuning.tune import TaskStats, _Display

    stats = [TaskStats("matmul", 1.0, trials=3, best_sec=2e-3), TaskStats("softmax", 2.0)]
    monkeypatch.setattr(_Display, "LOG_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="autotune.tuning.tune"), _Display(stats, total=10, enabled=True) as display:
        display.update()
    assert "tuning: 3/10 trials  tasks 1/2  failed 0  tuned kernels 2.00 ms" in caplog.text
