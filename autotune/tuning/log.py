"""The tuning log: MetaSchedule records on disk that survive crashes, bad lines and two writers.

A log directory holds two append-only JSON-lines files:

    workloads.jsonl  {"id": <structural hash>, "workload": <Workload.as_json()>}
    records.jsonl    {"id": <workload id>, "target": <target JSON>, "tvm": <version>,
                      "record": <TuningRecord.as_json()>[, "remeasured": {"at": <unix time>,
                      "rounds": [<seconds>, ...], "won": <bool>}]}

A line with "remeasured" is a schedule measured again after the search, side by side with its
rivals (tuning/remeasure.py), its time the median of those rounds: it replaces every earlier
time of the same schedule of the same kernel, in this log or another read with it. A kernel
whose schedules were re-measured has a winner: the newest line that says "won": true (lines
written before "won" existed: the lowest median among them). A build takes the winner whatever
the kernel's other records say: their times are single measurements from other hours or other
machines, not comparable with the winner's rounds (read with `winners_only`).

A trace may hold a TVM object (TransformLayout's IndexMap, from weight packing): it is stored
as its TVM JSON text, the form MetaSchedule's trace reader parses back.

A file may have a compacted part beside it, `workloads.jsonl.gz` / `records.jsonl.gz` (`compact_log`:
its earlier lines, gzipped as they were): readers read that part first, then the plain file, where
new lines are appended as before. The shipped logs are compacted (a tenth of the bytes).

Each line is written whole with one `write` under an exclusive `flock`, then flushed and
fsync'ed: a crash or Ctrl-C loses at most the record being measured, and two processes tuning
into the same directory never interleave partial lines. Reading never stops at a bad line: a
truncated or garbage line, a record for an unknown workload, another target or another TVM
version is reported with its file and line number and skipped; reading never rewrites a file.

`TuningLog` is a MetaSchedule `Database`: it keeps the records in an in-memory database for
queries and appends every new one to disk as it is committed.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from autotune.support.tvm_compat import normalize_workload, tuning_record_json

WORKLOADS_FILE = "workloads.jsonl"
RECORDS_FILE = "records.jsonl"
COMPACTED = ".gz"  # suffix of a file's compacted part


def record_to_json(record: ms.database.TuningRecord):
    """TuningRecord.as_json(), which raises on the IndexMap of a TransformLayout instruction."""
    from tvm.tirx import FloatImm, IntImm
    from tvm_ffi import Array, Map

    def plain(obj):
        if obj is None or isinstance(obj, (int, float)):
            return obj
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, (IntImm, FloatImm)):
            return obj.value
        if isinstance(obj, Array):
            return [plain(item) for item in obj]
        if isinstance(obj, Map):
            return {plain(k): plain(v) for k, v in obj.items()}
        return tvm.ir.save_json(obj).strip()

    return plain(tuning_record_json(record))


@dataclass
class LogProblem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class LogReadReport:
    """What reading a log found: good records, and each skipped line with why."""

    workloads: int = 0
    records: int = 0
    superseded: int = 0  # record lines replaced by a newer re-measurement of their schedule
    set_aside: int = 0  # records of re-measured kernels left out (winners_only): the winner is their pick
    problems: list[LogProblem] = field(default_factory=list)
    passed_over: set[str] = field(default_factory=set)  # ids of the workloads not read (`only`), their records neither

    @property
    def good_lines(self) -> int:
        """Record lines that passed the checks, whether read as records or replaced."""
        return self.records + self.superseded + self.set_aside

    def problem_summary(self, listed: int = 10, other_targets: bool = True) -> list[str]:
        """The skipped lines for a person: records for other targets counted in one line (unless
        `other_targets` is False: the shipped log holds several CPUs' records by design), the rest
        (corrupt or unreadable lines) listed, the first `listed` of them."""
        other = [p for p in self.problems if p.reason.startswith("record for another target")]
        rest = [p for p in self.problems if p not in other]
        lines = [f"skipped {p}" for p in rest[:listed]]
        if len(rest) > listed:
            lines.append(f"... and {len(rest) - listed} more unreadable lines")
        if other and other_targets:
            lines.append(f"{len(other)} records for other targets skipped (`autotune inspect LOG` lists them)")
        return lines

    def summary(self) -> str:
        text = f"{self.records} records over {self.workloads} workloads"
        if self.superseded:
            text += f" ({self.superseded} earlier times replaced by re-measurements)"
        if self.set_aside:
            text += f" ({self.set_aside} not used: their kernel's re-measurement picked another schedule)"
        if self.problems:
            text += f", {len(self.problems)} lines skipped"
        return text


def target_key(target: tvm.target.Target) -> str:
    """A stable string naming a target, stored with each record."""
    return json.dumps(_plain(target.export()), sort_keys=True)


# What decides whether a schedule tuned for one CPU is right for another: the vector ISA it was
# tuned with (its split factors assume that vector width) and, for schedules that tensorize, the
# dot-product / matrix instructions they call. Core counts and CPU names do not: a log tuned on one
# AVX-512 machine applies on every AVX-512 machine, under `taskset` too.
_VECTOR_LEVELS = {  # family: [(level, features it needs)], widest first
    "x86": [("avx512", {"avx512f", "avx512bw", "avx512dq", "avx512vl"}), ("avx2", {"avx2", "fma"})],
    "arm": [("sve", {"sve"}), ("neon", {"neon"})],
}
_MATRIX_FEATURES = {
    "avx512vnni", "avxvnni", "avx512bf16", "avx512fp16", "amx-tile", "amx-bf16", "amx-int8",
    "dotprod", "i8mm", "bf16", "sve2",
}


@dataclass(frozen=True)
class ScheduleISA:
    """The instruction-set facts of a target that its tuned schedules depend on."""

    kind: str
    family: str
    vector: str  # the widest vector level (x86: avx512 / avx2 / base), or the GPU arch
    matrix: frozenset  # dot-product / matrix-engine features

    def accepts(self, tuned_for: "ScheduleISA", tensorizes: bool) -> bool:
        """Whether a record tuned for `tuned_for` is valid and meant for this target."""
        same = (self.kind, self.family, self.vector) == (tuned_for.kind, tuned_for.family, tuned_for.vector)
        return same and (not tensorizes or tuned_for.matrix <= self.matrix)


def schedule_isa(target: tvm.target.Target) -> ScheduleISA:
    kind = target.kind.name
    if kind != "llvm":
        return ScheduleISA(kind, kind, str(target.attrs.get("arch", "")), frozenset())
    from tvm.target import codegen

    family = "arm" if "aarch64" in str(target.attrs.get("mtriple", "")) else "x86"
    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    vector = next((name for name, need in _VECTOR_LEVELS[family] if need <= features), "base")
    return ScheduleISA(kind, family, vector, frozenset(features & _MATRIX_FEATURES))


@functools.lru_cache(maxsize=64)
def isa_of_target_key(key: str) -> ScheduleISA:
    return schedule_isa(tvm.target.Target(json.loads(key)))


def record_fits_target(record: dict, key: str, isa: ScheduleISA) -> bool:
    """Whether a log line's record applies to the target whose `target_key` and ISA are given."""
    if record.get("target") == key:
        return True
    try:
        tuned_for = isa_of_target_key(record.get("target"))
    except Exception:  # a target string this TVM cannot parse: not one to apply (reported by the caller)
        return False
    tensorizes = '"Tensorize"' in json.dumps(record.get("record", ""))
    return isa.accepts(tuned_for, tensorizes)


def _plain(obj):
    """TVM containers (Map, Array) to Python dicts and lists, for JSON."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "Array":
        return [_plain(v) for v in obj]
    if isinstance(obj, (int, float, bool, str)) or obj is None:
        return obj
    return str(obj)


def _append_line(path: Path, obj: dict) -> None:
    """Append one JSON line atomically with respect to other writers, and make it durable."""
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            # A previous writer killed mid-line leaves no newline at the end: start a fresh line
            # so that its fragment stays one (reported) bad line and ours stays whole.
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":
                        data = b"\n" + data
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _parts(path: Path) -> list[Path]:
    """The files holding a log file's lines, in order: its compacted part, then itself."""
    return [part for part in (_compacted(path), path) if part.exists()]


def _compacted(path: Path) -> Path:
    return path.with_name(path.name + COMPACTED)


def _read_lines(path: Path):
    """Yield (file, line number, parsed JSON or None, reason) for each non-empty line of `path`'s
    compacted part, then of `path`."""
    for part in _parts(path):
        yield from _lines_of(part)


def _lines_of(part: Path):
    number, compacted = 0, part.name.endswith(COMPACTED)
    try:
        with gzip.open(part, "rb") if compacted else open(part, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield str(part), number, None, f"not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); truncated or corrupt line"
                    continue
                if not isinstance(obj, dict):
                    yield str(part), number, None, "not a JSON object"
                    continue
                yield str(part), number, obj, ""
    except (EOFError, OSError, zlib.error) as exc:  # a truncated or damaged compacted part: the lines before count
        if not compacted:
            raise
        yield str(part), number + 1, None, f"compressed data unreadable from here on ({type(exc).__name__}: {exc})"


def record_lines(log_dir: str | Path):
    """Every record line of a log that parses as a JSON object, both parts, in order, unchecked:
    for a look at the lines without replaying them (`read_log` checks and replays)."""
    return (obj for _, _, obj, _ in _read_lines(Path(log_dir) / RECORDS_FILE) if obj is not None)


def workload_lines(log_dir: str | Path):
    """`record_lines` of the workloads file."""
    return (obj for _, _, obj, _ in _read_lines(Path(log_dir) / WORKLOADS_FILE) if obj is not None)


def workload_id(mod: tvm.IRModule) -> str:
    """The id a workload is filed under: a digest of its serialised IR (stable across processes)."""
    return hashlib.sha256(tvm.ir.save_json(mod).encode()).hexdigest()[:24]


def structure_key(func) -> str:
    """The structural hash a kernel's records are filed under (the first field of a workload line)."""
    return str(ms.database.Workload(normalize_workload(func)).as_json()[0])


def read_log(
    log_dir: str | Path, target: tvm.target.Target | None = None, memory=None, only: set[str] | None = None
) -> tuple[LogReadReport, dict]:
    """Read a log directory into `memory` (a MetaSchedule MemoryDatabase) and report what was skipped.

    Records for another target (when `target` is given) or another TVM version are skipped and
    reported. `only` (a set of `structure_key`s) reads just the workloads of those kernels and
    their records, quietly: a large shipped log is read in a fraction of the time.
    Returns (report, {workload id: Workload}).
    """
    return read_logs([(log_dir, only)], target, memory)[0]


@dataclass
class _Source:
    """One log directory's lines that passed the checks, before they are committed."""

    report: LogReadReport
    workloads: dict  # workload id -> Workload
    same_structure: dict  # MetaSchedule's structural hash -> workload ids
    structure: dict  # workload id -> its structural hash
    records: list  # (file, line number, workload id, line object), in the order read


def read_logs(
    sources: list, target: tvm.target.Target | None = None, memory=None, winners: dict | None = None,
    winners_only: bool = False, remeasured: set | None = None,
) -> list:
    """`read_log` over several (log_dir, only) sources into one `memory`: [(report, workloads)] per source.

    Re-measurements span the sources: a schedule's newest re-measurement, in whichever log, is the
    one of its lines committed (lines compare by `record_key`). `winners` collects, per kernel
    (`structure_key`), the committed record of its re-measurement's winner (see the module's
    docstring); `winners_only` leaves such a kernel's other records out, so that a database built
    for a build picks the winner.
    """
    parsed = [_parse_log(Path(log_dir), target, only) for log_dir, only in sources]
    block_names: dict[tuple, tuple] = {}

    def key_of(index: int, wid: str, obj: dict) -> tuple[str, str]:
        source = parsed[index]
        if (index, wid) not in block_names:
            block_names[index, wid] = _block_names(source.workloads[wid].mod)
        return _schedule_key(obj["record"], source.structure[wid], block_names[index, wid])

    newest: dict[tuple, tuple] = {}  # schedule key -> ((time, source, place in it), line object) of its newest re-measurement
    for index, source in enumerate(parsed):
        for order, (path, number, wid, obj) in enumerate(source.records):
            if "remeasured" in obj:
                stamp = (float(obj["remeasured"].get("at", 0)), index, order)
                key = key_of(index, wid, obj)
                if key not in newest or stamp > newest[key][0]:
                    newest[key] = (stamp, obj)
    winner_keys = _winner_keys(newest)
    if remeasured is not None:
        remeasured.update(newest)
    remeasured_structures = {key[0] for key in newest}
    for source in parsed if memory is not None else []:
        for workload in source.workloads.values():  # in file order: the first of twins is the one known
            memory.commit_workload(workload.mod)
    for index, source in enumerate(parsed):
        for order, (path, number, wid, obj) in enumerate(source.records):
            structure, key = source.structure[wid], None
            if structure in remeasured_structures:
                key = key_of(index, wid, obj)
                if key in newest and newest[key][0][1:] != (index, order):
                    source.report.superseded += 1  # a newer re-measurement of the same schedule replaces it
                    continue
                if winners_only and structure in winner_keys and key != winner_keys[structure]:
                    source.report.set_aside += 1
                    continue
            record = _commit(memory, path, number, wid, obj, source)
            if record is not None and winners is not None and key is not None and winner_keys.get(structure) == key:
                winners[structure] = record
    return [(source.report, source.workloads) for source in parsed]


def _winner_keys(newest: dict) -> dict:
    """structure -> schedule key of each re-measured kernel's winner: the newest line that won;
    where none says (lines from before "won"), the lowest median among them."""
    best: dict[str, tuple] = {}  # structure -> (rank, key)
    for key, ((at, _, _), obj) in newest.items():
        won = obj["remeasured"].get("won")
        if won is False:
            continue
        secs = [float(x) for x in obj["record"][1] or []]
        rank = (1, at) if won else (0, -(sum(secs) / len(secs)) if secs else -math.inf)
        if key[0] not in best or rank > best[key[0]][0]:
            best[key[0]] = (rank, key)
    return {structure: key for structure, (_, key) in best.items()}


def _parse_log(log_dir: Path, target, only) -> _Source:
    source = _Source(LogReadReport(), {}, {}, {}, [])
    report, workloads = source.report, source.workloads
    skipped = report.passed_over
    for path, number, obj, reason in _read_lines(log_dir / WORKLOADS_FILE):
        if obj is None:
            report.problems.append(LogProblem(path, number, reason))
            continue
        if only is not None and str(obj.get("workload", [None])[0]) not in only:
            skipped.add(obj.get("id"))
            continue
        try:
            wid = obj["id"]
            if wid not in workloads:
                workloads[wid] = ms.database.Workload.from_json(obj["workload"])
                source.structure[wid] = str(obj["workload"][0])
                source.same_structure.setdefault(source.structure[wid], []).append(wid)
        except Exception as exc:  # a JSON line that is not a workload
            report.problems.append(LogProblem(path, number, f"not a workload ({type(exc).__name__}: {exc})"))
    report.workloads = len(workloads)
    if target is not None:
        want_key, want_isa = target_key(target), schedule_isa(target)
    for path, number, obj, reason in _read_lines(log_dir / RECORDS_FILE):
        if obj is None:
            report.problems.append(LogProblem(path, number, reason))
            continue
        wid = obj.get("id")
        if wid in skipped:
            continue
        if wid not in workloads:
            report.problems.append(LogProblem(path, number, f"record for unknown workload {wid!r}"))
            continue
        if obj.get("tvm") != tvm.__version__:
            report.problems.append(
                LogProblem(path, number, f"record from TVM {obj.get('tvm')}, this is TVM {tvm.__version__}")
            )
            continue
        if target is not None and not record_fits_target(obj, want_key, want_isa):
            report.problems.append(LogProblem(path, number, f"record for another target: {obj.get('target')}"))
            continue
        if not _has_trace_shape(obj.get("record")):  # (the re-measurement keys read the trace before any replay)
            report.problems.append(LogProblem(path, number, "not a tuning record (no [[instructions, decisions], ...] trace)"))
            continue
        source.records.append((path, number, wid, obj))
    return source


def _has_trace_shape(record_json) -> bool:
    """Whether a record line's "record" has the shape `_rename_trace` and `_winner_keys` read: a trace
    [instructions (4-element lists), decisions], then the run times. Whether it replays is `_replay`'s
    question."""
    try:
        (instructions, _decisions), _run_secs, *_ = record_json
        return all(isinstance(inst, list) and len(inst) == 4 for inst in instructions)
    except (TypeError, ValueError):
        return False


def _commit(memory, path: str, number: int, wid: str, obj: dict, source: _Source):
    """Replay one record line and commit it to `memory`: the committed record, or None (reported)."""
    report, workloads = source.report, source.workloads
    record, replayed_on = _replay(obj["record"], wid, workloads, source.same_structure)
    if isinstance(record, Exception):
        report.problems.append(LogProblem(path, number, f"not a tuning record ({type(record).__name__}: {record})"))
        return None
    if memory is not None:
        # The in-memory database files it under the first structurally equal workload it
        # knows, whose blocks may be named otherwise: its trace must name those blocks.
        source_mod = workloads[replayed_on].mod
        known = memory.commit_workload(source_mod)
        if not known.mod.same_as(source_mod):
            try:
                record = ms.database.TuningRecord.from_json(_renamed_blocks(obj["record"], source_mod, known.mod), known)
            except Exception as exc:
                report.problems.append(
                    LogProblem(path, number, f"record for a twin kernel does not replay on it ({type(exc).__name__})")
                )
                return None
        record = ms.database.TuningRecord(record.trace, known, record.run_secs, record.target, record.args_info)
        memory.commit_tuning_record(record)
    report.records += 1
    return record


def _replay(record_json, wid: str, workloads: dict, same_structure: dict):
    """Rebuild a record by replaying its trace on its workload: (record, workload id it replayed on).

    MetaSchedule files a record under the first structurally equal workload it saw, and
    structural equality ignores block names: a layer_norm tuned for one model can be filed
    under another model's equal layer_norm whose blocks are named differently, and its trace
    then only replays on the twin. Try the workload named first, then its structural twins.
    """
    first_error = None
    twins = same_structure.get(str(workloads[wid].as_json()[0]), [])
    for candidate in [wid] + [t for t in twins if t != wid]:
        try:
            return ms.database.TuningRecord.from_json(record_json, workloads[candidate]), candidate
        except Exception as exc:
            first_error = first_error or exc
    return first_error, wid


_BLOCK = re.compile(r'T\.sblock\("([^"]+)"\)')


def _block_names(mod: tvm.IRModule) -> tuple[str, ...]:
    return tuple(_BLOCK.findall(mod.script()))


def _renamed_blocks(record_json, source: tvm.IRModule, target: tvm.IRModule):
    """The record with its trace's block names mapped from `source` to its structural twin `target`.

    Twins have the same blocks in the same order, so the n-th block of one is the n-th of the other.
    """
    return _rename_trace(record_json, dict(zip(_block_names(source), _block_names(target))))


def _rename_trace(record_json, mapping: dict):
    """Blocks the trace itself creates are named after their origin (`x_sum` -> `x_sum_rf`): the
    longest original name they start with is mapped."""
    by_length = sorted(mapping, key=len, reverse=True)

    def rename(name: str) -> str:
        if name in mapping:
            return mapping[name]
        origin = next((n for n in by_length if name.startswith(n)), None)
        return mapping[origin] + name[len(origin):] if origin else name

    (insts, decisions), *rest = record_json
    renamed = [
        [kind, inputs, [rename(attrs[0]), *attrs[1:]] if kind == "GetSBlock" else attrs, outputs]
        for kind, inputs, attrs, outputs in insts
    ]
    return [[renamed, decisions], *rest]


def _schedule_key(record_json, structure: str, block_names: tuple) -> tuple[str, str]:
    """A schedule of a kernel whatever its blocks are named: (the kernel's structural hash, the trace
    with each block named by its position in the kernel)."""
    canonical = {name: f"#{i}" for i, name in enumerate(block_names)}
    return structure, json.dumps(_rename_trace(record_json, canonical)[0], sort_keys=True)


def record_key(record: ms.database.TuningRecord) -> tuple[str, str]:
    """A record's schedule, comparable with the key `read_logs` gives the line it was written as."""
    mod = record.workload.mod
    return _schedule_key(record_to_json(record), str(tvm_ffi.structural_hash(mod)), _block_names(mod))


def record_on(record: ms.database.TuningRecord, mod: tvm.IRModule) -> ms.database.TuningRecord:
    """`record` replayed on `mod`, a module structurally equal to its workload's, whose blocks may be
    named otherwise (the search replays a record on the task's own module)."""
    workload = ms.database.Workload(mod)
    as_json = record_to_json(record)
    try:
        return ms.database.TuningRecord.from_json(as_json, workload)
    except Exception:  # a twin: the trace names the blocks of the module the record was read for
        return ms.database.TuningRecord.from_json(_renamed_blocks(as_json, record.workload.mod, mod), workload)


@derived_object
class TuningLog(ms.database.PyDatabase):
    """A MetaSchedule database backed by an append-only log directory."""

    def __init__(
        self,
        log_dir: str | Path,
        target: tvm.target.Target,
        module_equality: str = "structural",
        seed_log: str | Path | None = None,
        kernels: set[str] | None = None,
    ):
        """`kernels` (their `structure_key`s): read only these kernels' workloads and records, from
        the log and from `seed_log`; None: the log whole (and nothing from `seed_log`). A tuning run
        needs its own kernels' records only, and replaying every record of a large log (the
        shipped one: 197 MB of workloads) took minutes. `seed_log` (the shipped log): its records
        start the search, and nothing is written to it."""
        super().__init__()
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.target = target
        self._target_key = target_key(target)
        self._module_equality = module_equality
        self._sources = [(self.log_dir, kernels)]
        if seed_log is not None and Path(seed_log).resolve() != self.log_dir.resolve():
            self._sources.append((Path(seed_log), kernels or set()))
        self._load()
        # The in-memory database returns, for a module, the first structurally equal workload it
        # knows; structural equality ignores block names, and a trace replays only on a module
        # with its own block names. So records are filed under the module this process tuned.
        self._tuned_as: list[tuple[ms.database.Workload, str]] = []
        self.committed = 0  # records appended by this process

    def _load(self) -> None:
        self._memory = ms.database.MemoryDatabase(module_equality=self._module_equality)
        self.winners: dict[str, ms.database.TuningRecord] = {}  # structure_key -> its re-measurement's winner
        self.remeasured: set[tuple[str, str]] = set()  # record_key of every schedule re-measured
        (self.report, loaded), *seed = read_logs(self._sources, self.target, self._memory, self.winners,
                                                 remeasured=self.remeasured)
        self.new_records: list[ms.database.TuningRecord] = []  # committed since the logs were read
        self._ids_on_disk = set(loaded) | self.report.passed_over  # (a workload is appended only when new)
        self.seed_records = seed[0][0].records if seed else 0

    def reload(self) -> None:
        """Read the logs again: re-measurements appended since replace the times they supersede and
        name the winners; records committed before count as read (`new_records` starts empty)."""
        self._load()
        self._tuned_as = []

    # -- what MetaSchedule calls ------------------------------------------------------------
    def has_workload(self, mod: tvm.IRModule) -> bool:
        return self._memory.has_workload(mod)

    def has_records(self, mod: tvm.IRModule) -> bool:
        """Whether a record for this target exists for `mod` (a workload alone, e.g. one whose records
        were for another CPU, does not count)."""
        return self._memory.has_workload(mod) and bool(self._memory.get_top_k(self.known_workload(mod), 1))

    def _file_workload(self, mod: tvm.IRModule) -> str:
        wid = workload_id(mod)
        if wid not in self._ids_on_disk:
            _append_line(self.log_dir / WORKLOADS_FILE, {"id": wid, "workload": ms.database.Workload(mod).as_json()})
            self._ids_on_disk.add(wid)
        return wid

    def known_workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        """The workload `mod`'s records are filed under in memory (nothing is written)."""
        return self._memory.commit_workload(mod)

    def commit_workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        workload = self._memory.commit_workload(mod)
        wid = self._file_workload(mod)
        self._tuned_as = [(w, i) for w, i in self._tuned_as if not w.same_as(workload)] + [(workload, wid)]
        return workload

    def commit_tuning_record(self, record: ms.database.TuningRecord) -> None:
        self._memory.commit_tuning_record(record)
        self._append_record(record)
        self.new_records.append(record)

    def commit_remeasurement(self, record: ms.database.TuningRecord, rounds: list[float], won: bool) -> None:
        """Append a schedule's re-measured time (`record.run_secs`, the median of `rounds`, each a
        time in seconds) and whether it won. Read back (`reload`), it replaces every earlier time of
        that schedule, and the kernel's winner is the build's pick."""
        self._append_record(record, remeasured={"at": time.time(), "rounds": [float(r) for r in rounds], "won": won})

    def _append_record(self, record: ms.database.TuningRecord, **extra) -> None:
        wid = next((i for w, i in self._tuned_as if w.same_as(record.workload)), None)
        if wid is None:  # MetaSchedule commits workloads first; be safe anyway
            wid = self._file_workload(record.workload.mod)
        _append_line(
            self.log_dir / RECORDS_FILE,
            {"id": wid, "target": self._target_key, "tvm": tvm.__version__, "record": record_to_json(record), **extra},
        )
        self.committed += 1

    def get_top_k(self, workload: ms.database.Workload, top_k: int):
        return self._memory.get_top_k(workload, top_k)

    def get_all_tuning_records(self):
        return self._memory.get_all_tuning_records()

    def query_tuning_record(self, mod, target, workload_name):
        return self._memory.query_tuning_record(mod, target, workload_name)

    def query_schedule(self, mod, target, workload_name):
        return self._memory.query_schedule(mod, target, workload_name)

    def query_ir_module(self, mod, target, workload_name):
        return self._memory.query_ir_module(mod, target, workload_name)

    def __len__(self) -> int:
        return len(self._memory)


@dataclass
class MergeReport:
    workloads_added: int = 0
    records_added: int = 0
    records_present: int = 0  # already in the destination, not copied again
    problems: list[LogProblem] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.records_added} records and {self.workloads_added} workloads added "
            f"({self.records_present} records were already there)"
        )
        return text + (f"; {len(self.problems)} source lines skipped" if self.problems else "")


def merge_log(src: str | Path, dst: str | Path) -> MergeReport:
    """Append to `dst` the records (and their workloads) of `src` that it lacks.

    Lines are copied as they are, through the same locked, fsync'ed append as tuning, so a
    merge into a log that is being tuned into is safe. Bad source lines are reported and skipped.
    Records keep their target and TVM version: readers filter them as for any record.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    report = MergeReport()
    have_workloads = {obj["id"] for _, _, obj, _ in _read_lines(dst / WORKLOADS_FILE) if obj and "id" in obj}
    have_records = {json.dumps(obj, sort_keys=True) for _, _, obj, _ in _read_lines(dst / RECORDS_FILE) if obj}
    src_workloads = {}
    for path, number, obj, reason in _read_lines(src / WORKLOADS_FILE):
        if obj is None or "id" not in obj or "workload" not in obj:
            report.problems.append(LogProblem(path, number, reason or "not a workload line"))
            continue
        src_workloads.setdefault(obj["id"], obj)
    for path, number, obj, reason in _read_lines(src / RECORDS_FILE):
        if obj is None or obj.get("id") not in src_workloads or "record" not in obj:
            report.problems.append(LogProblem(path, number, reason or "record for an unknown workload"))
            continue
        key = json.dumps(obj, sort_keys=True)
        if key in have_records:
            report.records_present += 1
            continue
        if obj["id"] not in have_workloads:
            _append_line(dst / WORKLOADS_FILE, src_workloads[obj["id"]])
            have_workloads.add(obj["id"])
            report.workloads_added += 1
        _append_line(dst / RECORDS_FILE, obj)
        have_records.add(key)
        report.records_added += 1
    return report


@dataclass
class CompactReport:
    files: dict = field(default_factory=dict)  # file name -> (lines moved, plain bytes moved, compacted bytes after)

    def summary(self) -> str:
        return "; ".join(f"{name}: {lines} lines ({moved / 1e6:.1f} MB) moved into {name}{COMPACTED} "
                         f"({after / 1e6:.1f} MB)" for name, (lines, moved, after) in self.files.items())


def compact_log(log_dir: str | Path) -> CompactReport:
    """Move each file's lines, as they are, into its compacted part (gzip), leaving the plain file
    empty for the lines appended from now on. Nothing is lost or changed: readers read the
    compacted part first, then the plain file, and find the same lines in the same order.

    Each file is done under the lock that appenders take, so a tuning run writing into the log
    waits for it. The new compacted part (the old one's gzip members, then one more of the plain
    file's bytes, ending with a newline) is written beside the old, synced and renamed over it;
    only then is the plain file emptied. A crash in between leaves the plain file's lines in both
    parts: read twice, the same workloads and records, nothing lost."""
    log_dir = Path(log_dir)
    report = CompactReport()
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        path = log_dir / name
        if not path.exists():
            continue
        compacted = _compacted(path)
        fresh = compacted.with_suffix(f"{COMPACTED}.tmp")
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = path.read_bytes()
            if not data:
                continue
            if not data.endswith(b"\n"):  # a line cut short by a crash stays one (reported) line
                data += b"\n"
            with open(fresh, "wb") as out:
                if compacted.exists():
                    with open(compacted, "rb") as members:
                        shutil.copyfileobj(members, out)
                out.write(gzip.compress(data, compresslevel=9, mtime=0))
                out.flush()
                os.fsync(out.fileno())
            os.replace(fresh, compacted)
            _sync_dir(log_dir)
            os.ftruncate(fd, 0)
            os.fsync(fd)
            report.files[name] = (data.count(b"\n"), len(data), compacted.stat().st_size)
        finally:
            os.close(fd)  # (releases the lock)
    return report


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_digest(log_dir: str | Path) -> str | None:
    """sha256 of the log's files, to record in an artifact which log built it."""
    log_dir = Path(log_dir)
    h = hashlib.sha256()
    found = False
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        for path in _parts(log_dir / name):
            found = True
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest() if found else None
