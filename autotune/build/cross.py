"""Cross compilers that link `.so` artifacts for a CPU other than this one (aarch64 from x86).

TVM emits the object code itself (LLVM, `mtriple` from the preset); the cross compiler only
links it, with the imported-module blob, into a shared library for the target's ABI.
"""

from __future__ import annotations

import shutil
import subprocess

from autotune.support.errors import TargetError

# compiler command -> Debian package that provides it
DEBIAN_PACKAGES = {
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
}
DEFAULT_COMPILER = "aarch64-linux-gnu-g++"


def install_hint(compiler: str) -> str:
    package = DEBIAN_PACKAGES.get(compiler)
    if package:
        return f"install it: `sudo apt-get install -y {package}` (Debian/Ubuntu)"
    return f"install a cross compiler that provides `{compiler}` and put it on PATH"


def ensure_cross_toolchain(compiler: str = DEFAULT_COMPILER) -> str:
    """The path of `compiler`, checked to run; TargetError with what to install when it does not."""
    path = shutil.which(compiler)
    if path is None:
        raise TargetError(f"the cross compiler `{compiler}` is not installed; {install_hint(compiler)}")
    try:
        machine = subprocess.run([path, "-dumpmachine"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TargetError(f"the cross compiler {path} does not run ({exc}); {install_hint(compiler)}") from exc
    if not machine.stdout.strip():
        raise TargetError(f"the cross compiler {path} reports no target machine; {install_hint(compiler)}")
    return path


def cross_compiler(preset):
    """An `fcompile` for `export_library` that links with the preset's cross compiler."""
    from tvm.support import cc

    compiler = preset.cross_compiler or DEFAULT_COMPILER
    path = ensure_cross_toolchain(compiler)
    return cc.cross_compiler(path)
