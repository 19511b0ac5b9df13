"""Shippable CUDA artifacts: device code compiled to a fatbin (SASS + PTX) inside the `.so`.

TVM's CUDA codegen hands its CUDA C++ source to the runtime factory `ffi.Module.create.cuda`,
which compiles it when TVM's CUDA runtime is loaded. On a machine without an NVIDIA driver that
runtime is absent (`tvm/lib/libtvm_runtime_cuda.so` needs `libcuda.so.1`), so codegen keeps a
fallback module holding the *source* (format "cuda"); exported as is, the library needs a CUDA
compiler on the GPU machine at load time, and fails to load where there is none.

So `export_cuda_library` exports with its own import packer: it serialises the import tree as
TVM does (`runtime.ModulePackImportsToTensor`), compiles each CUDA module still in source form
with nvcc into a fatbin for the preset's arch (sm_XX SASS, plus compute_XX PTX so newer GPUs
can JIT it), rewrites that module's record to format "fatbin", and links the blob into the
`.so` under TVM's blob symbol. TVM's CUDA loader (`ffi.Module.load_from_bytes.cuda`) reads the
same record layout, `[fmt][function table][code]`, and hands the fatbin to `cuModuleLoadData`.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from autotune.support.errors import BuildFailed
from autotune.support.tvm_compat import pack_imports_blob

FATBIN_MAGIC = 0xBA55ED50


# -- nvcc ---------------------------------------------------------------------------------------
def find_nvcc() -> str:
    """The nvcc that TVM's compiler driver (tvm.support.nvcc) runs: the one on PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BuildFailed(
            "building for a CUDA target needs nvcc (the CUDA toolkit) to compile the kernels, and none is on PATH. "
            "Install the CUDA toolkit and put its bin/ on PATH (no GPU or driver needed to build)."
        )
    return nvcc


def sm_version(arch) -> int | None:
    """'sm_90' -> 90 (also 'sm_90a'); None when `arch` is not of the form sm_XX."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", str(arch))
    return int(m.group(1)) if m else None


def arch_number(arch: str) -> str:
    """'sm_90' -> '90' (also 'sm_90a' -> '90a')."""
    m = re.fullmatch(r"sm_(\d+[a-z]?)", str(arch))
    if not m:
        raise BuildFailed(f"CUDA arch '{arch}' is not of the form sm_XX (e.g. sm_90)")
    return m.group(1)


def compile_fatbin(source: str, arch: str, options: list[str] | None = None) -> bytes:
    """Compile CUDA C++ `source` with TVM's nvcc driver into a fatbin with sm_XX SASS and compute_XX PTX."""
    import tvm
    from tvm.support import nvcc as tvm_nvcc

    find_nvcc()
    source = with_device_sources(source)
    num = arch_number(arch)
    compute = num.rstrip("a")
    gencode = ["-gencode", f"arch=compute_{num},code=sm_{num}", "-gencode", f"arch=compute_{compute},code=compute_{compute}"]
    try:
        with tvm.target.Target({"kind": "cuda", "arch": f"sm_{num}"}):  # the arch TVM's driver reads
            return bytes(tvm_nvcc.compile_cuda(source, "fatbin", arch=gencode, options=options, compiler="nvcc"))
    except RuntimeError as exc:
        kept = Path(tempfile.mkdtemp(prefix="autotune-failed-cuda-")) / "kernels.cu"
        kept.write_text(source)
        raise BuildFailed(
            f"nvcc failed to compile the generated CUDA kernels for {arch} (source kept at {kept}):\n{str(exc)[-4000:]}"
        ) from exc


@contextmanager
def nvcc_compile_callback(arch: str):
    """While active, TVM compiles CUDA kernels with nvcc into a fatbin for `arch`.

    Where TVM's CUDA runtime is loaded (a machine with an NVIDIA driver), codegen compiles the
    kernels at once through the global `tvm_callback_cuda_compile`, which defaults to NVRTC and
    fails without the `cuda-bindings` package. Wrap `tvm.compile` for CUDA targets in this so
    that every machine compiles the same way, for the preset's arch rather than the local GPU's.
    Without the CUDA runtime (no driver) codegen never calls it and `export_cuda_library` compiles.
    """
    import tvm_ffi

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    find_nvcc()

    def compile_with_nvcc(code, *_target):
        return bytearray(compile_fatbin(str(code), arch))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_with_nvcc, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
        else:
            tvm_ffi.remove_global_func("tvm_callback_cuda_compile")


# -- the imports blob (tvm_ffi library_module.cc: ProcessLibraryBin) ------------------------------
class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError("truncated")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u64_vector(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _raw(data: bytes) -> bytes:
    return _u64(len(data)) + data


def parse_imports_blob(blob: bytes) -> tuple[list[int], list[int], list[tuple[str, bytes | None]]]:
    """`<nbytes> <indptr> <children> (<kind> [<bytes>])*` -> (indptr, children, [(kind, payload)])."""
    head = _Reader(blob)
    nbytes = head.u64()
    reader = _Reader(blob[8 : 8 + nbytes])
    indptr, children = reader.u64_vector(), reader.u64_vector()
    modules = []
    for _ in range(len(indptr) - 1):
        kind = reader.raw().decode()
        modules.append((kind, None if kind == "_lib" else reader.raw()))
    if reader.pos != nbytes:
        raise ValueError(f"{nbytes - reader.pos} trailing bytes")
    return indptr, children, modules


def serialize_imports_blob(indptr: list[int], children: list[int], modules: list[tuple[str, bytes | None]]) -> bytes:
    body = _u64(len(indptr)) + b"".join(map(_u64, indptr)) + _u64(len(children)) + b"".join(map(_u64, children))
    for kind, payload in modules:
        body += _raw(kind.encode()) + (b"" if payload is None else _raw(payload))
    return _u64(len(body)) + body


def split_cuda_record(payload: bytes, sources: list[bytes]) -> tuple[str, bytes, bytes]:
    """A CUDA module record `[fmt][fmap][code]` -> (fmt, fmap bytes, code).

    The function table's layout is TVM-internal; we only need to know where it ends, which is
    where the code (the last field) starts. For a source record the code is one of `sources`.
    """
    reader = _Reader(payload)
    fmt = reader.raw().decode()
    if fmt == "cuda":
        for code in sources:
            tail = _raw(code)
            if len(tail) <= len(payload) - reader.pos and payload.endswith(tail):
                return fmt, payload[reader.pos : len(payload) - len(tail)], code
        raise BuildFailed(
            "the CUDA module record in the exported library does not end with the module's source: TVM's "
            "serialization of CUDA modules has changed; autotune.support.cuda_library needs updating for this TVM version"
        )
    return fmt, b"", b""


def cuda_sources(module) -> list[bytes]:
    """CUDA C++ sources of the CUDA modules in `module`'s import tree."""
    out, stack, seen = [], [module], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            out.append(str(m.inspect_source("cuda")).encode())
        stack.extend(m.imports)
    return out


def compile_cuda_records(blob: bytes, sources: list[bytes], arch: str) -> tuple[bytes, list[str]]:
    """Replace every CUDA source record in the blob by a fatbin record; (new blob, what was done)."""
    indptr, children, modules = parse_imports_blob(blob)
    notes, out = [], []
    for kind, payload in modules:
        if kind == "cuda":
            fmt, fmap, code = split_cuda_record(payload, sources)
            if fmt == "cuda":
                fatbin = compile_fatbin(code.decode(), arch)
                payload = _raw(b"fatbin") + fmap + _raw(fatbin)
                notes.append(f"cuda: compiled {len(code)} B of CUDA source to a {len(fatbin)} B fatbin for {arch}")
            else:
                notes.append(f"cuda: kept the module already compiled by TVM (format {fmt})")
        out.append((kind, payload))
    if not any(k == "cuda" for k, _ in modules):
        notes.append("cuda: the module has no CUDA kernels")
    return serialize_imports_blob(indptr, children, out), notes


def _blob_c_source(symbol: str, blob: bytes) -> str:
    rows = []
    for i in range(0, len(blob), 32):
        rows.append(",".join(str(b) for b in blob[i : i + 32]))
    return (
        "#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
        f"__attribute__((visibility(\"default\"))) extern const unsigned char {symbol}[];\n"
        f"const unsigned char {symbol}[{len(blob)}] = {{\n" + ",\n".join(rows) + "\n};\n"
        "#ifdef __cplusplus\n}\n#endif\n"
    )


def _packer(arch: str, notes: list[str]):
    """An `fpack_imports` for export_library that compiles CUDA source records to fatbins."""

    def fpack_imports(module, is_system_lib, symbol_prefix, workspace_dir):
        if is_system_lib:
            raise BuildFailed("CUDA artifacts are shared libraries; a system-lib host module is not supported")
        blob, blob_name = pack_imports_blob(module)
        blob, done = compile_cuda_records(blob, cuda_sources(module), arch)
        notes.extend(done)
        symbol = symbol_prefix + blob_name
        path = os.path.join(workspace_dir, f"{symbol_prefix}devc.c")
        Path(path).write_text(_blob_c_source(symbol, blob))
        return path

    return fpack_imports


def preset_arch(preset) -> str:
    arch = preset.resolved_target_dict().get("arch")
    if not arch:
        raise BuildFailed(f"target '{preset.name}' names no CUDA arch (sm_XX); add \"arch\" to its target dict")
    return str(arch)


def export_linked(module, path, arch: str) -> list[str]:
    """Export `module` (an executable, or a runtime module with CUDA imports) to the `.so` `path`,
    its CUDA kernels compiled by nvcc for `arch` into a fatbin inside. Returns notes."""
    notes: list[str] = []
    module.export_library(str(path), fpack_imports=_packer(arch, notes))
    return notes


def export_cuda_library(executable, path, preset) -> list[str]:
    """Export `executable` (a tvm.compile result for a CUDA target) to `path` with fatbin kernels."""
    return export_linked(executable, path, preset_arch(preset))


# -- inspection (tests, `autotune run` diagnostics) -----------------------------------------------
def embedded_fatbins(library: str | Path) -> list[bytes]:
    """The fatbin images embedded in a built library (found by their header magic)."""
    data = Path(library).read_bytes()
    magic = struct.pack("<I", FATBIN_MAGIC)
    out, pos = [], data.find(magic)
    while pos >= 0:
        _, _version, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        end = pos + header_size + body_size
        if header_size == 16 and end <= len(data):
            out.append(data[pos:end])
            pos = data.find(magic, end)
        else:
            pos = data.find(magic, pos + 4)
    return out


def fatbin_archs(fatbin: bytes) -> dict[str, list[str]]:
    """{"sass": ["sm_90"], "ptx": ["compute_90"]} from a fatbin's entry headers."""
    _, _, header_size, body_size = struct.unpack_from("<IHHQ", fatbin, 0)
    pos, end = header_size, header_size + body_size
    out: dict[str, list[str]] = {"sass": [], "ptx": []}
    while pos + 40 <= end:
        kind, _version, entry_header, entry_size = struct.unpack_from("<HHIQ", fatbin, pos)
        # entry header: kind(2) version(2) header_size(4) padded_size(8) unknown(4) ptx_version(4) arch(4)
        (sm,) = struct.unpack_from("<I", fatbin, pos + 28)
        if kind == 2:
            out["sass"].append(f"sm_{sm}")
        elif kind == 1:
            out["ptx"].append(f"compute_{sm}")
        if entry_header == 0:
            break
        pos += entry_header + entry_size
    return out


# -- device functions kernels call by name (T.call_extern), compiled with them -------------------
_DEVICE_SOURCES: dict[str, str] = {}  # symbol -> the CUDA C++ that defines it (and its helpers)


def register_device_source(symbols: list[str], source: str) -> None:
    """Make `source` part of every CUDA translation unit that calls one of `symbols`."""
    for symbol in symbols:
        _DEVICE_SOURCES[symbol] = source


def with_device_sources(code: str) -> str:
    """`code` preceded by the registered device sources it calls (each once)."""
    needed = dict.fromkeys(src for symbol, src in _DEVICE_SOURCES.items() if re.search(rf"\b{symbol}\(", code))
    return "".join(needed) + code
