#!/usr/bin/env python3
"""Run an aarch64 autotune artifact on this x86 machine, under qemu-user, through autotune's runtime.

The aarch64 side is made only of Debian arm64 packages (python3.11 and the libraries it links)
and the PyPI aarch64 wheels of the packages the runtime needs (apache-tvm, apache-tvm-ffi, numpy,
ml_dtypes, safetensors, typing_extensions), pinned to the versions installed here. The artifact
is loaded with `autotune.load` from this source tree, so what runs is the same runtime API a
user calls on an ARM board.

    python tools/run_on_qemu_aarch64.py setup                # once: ~130 MB into the env dir
    python tools/run_on_qemu_aarch64.py check                # says what is missing, exit 1 if so
    python tools/run_on_qemu_aarch64.py run out/m-arm/m.so --inputs in.npz -o out.npz

Needs: `apt-get install qemu-user` (provides qemu-aarch64), network access to the Debian mirror
and PyPI for `setup`. Env dir: $AUTOTUNE_QEMU_AARCH64_ENV or ~/.cache/autotune/qemu-aarch64.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENV = Path(os.environ.get("AUTOTUNE_QEMU_AARCH64_ENV", Path.home() / ".cache" / "autotune" / "qemu-aarch64"))
PYTHON = "usr/bin/python3.11"  # Debian bookworm's python3.11 (cp311, like the wheels below)

# Debian arm64 packages: python3.11 and the shared libraries it and the wheels link against.
DEBIAN_PACKAGES = [
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6", "libexpat1", "zlib1g", "libffi8", "libbz2-1.0",
    "liblzma5", "libssl3", "libcrypt1", "libuuid1", "libsqlite3-0", "libtinfo6", "libncursesw6",
    "libreadline8", "libnsl2", "libtirpc3", "libdb5.3", "libzstd1", "libgssapi-krb5-2", "libkrb5-3",
    "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1",
]
# PyPI distributions, pinned to the versions installed on this machine.
WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "safetensors", "typing_extensions"]
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]

# Runs inside qemu: load the artifact with autotune's runtime, feed it the inputs, save outputs.
_GUEST = r"""
import json, sys
import numpy as np
import autotune

def aligned(a, align=64):  # TVM's from_dlpack wants 64-byte aligned host memory
    buf = np.empty(a.nbytes + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out

library, inputs_path, outputs_path = sys.argv[1:4]
import platform
m = autotune.load(library, device="cpu")
with np.load(inputs_path) as f:
    inputs = {k: aligned(f[k]) for k in f.files}
out = m(**inputs)
out = out if isinstance(out, tuple) else (out,)
np.savez(outputs_path, *out)
print(json.dumps({"machine": platform.machine(), "outputs": [list(o.shape) for o in out]}))
"""


class QemuEnvMissing(RuntimeError):
    pass


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def check(env: Path = DEFAULT_ENV) -> dict:
    """The env's description; QemuEnvMissing saying what is absent and how to get it."""
    qemu = _qemu()
    if qemu is None:
        raise QemuEnvMissing("qemu-aarch64 is not installed (apt-get install -y qemu-user)")
    marker = env / "env.json"
    if not marker.exists() or not (env / "sysroot" / PYTHON).exists():
        raise QemuEnvMissing(f"no aarch64 Python env at {env} (python {Path(__file__).name} setup)")
    info = json.loads(marker.read_text())
    host_tvm = metadata.version("apache-tvm")
    if info["versions"].get("apache-tvm") != host_tvm:
        raise QemuEnvMissing(
            f"the aarch64 env at {env} has apache-tvm {info['versions'].get('apache-tvm')}, this machine "
            f"{host_tvm}: rerun setup"
        )
    return {**info, "qemu": qemu, "env": str(env)}


def _guest_env(env: Path) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "TVM_"))}
    out["PYTHONPATH"] = f"{env / 'site'}{os.pathsep}{REPO}"
    out["PYTHONNOUSERSITE"] = "1"
    out["QEMU_LD_PREFIX"] = str(env / "sysroot")
    return out


def guest_command(env: Path = DEFAULT_ENV) -> list[str]:
    """argv prefix that starts the aarch64 python under qemu (use with _guest_env)."""
    info = check(env)
    return [info["qemu"], "-L", str(env / "sysroot"), str(env / "sysroot" / PYTHON)]


def run_python(code: str, *args: str, env: Path = DEFAULT_ENV, timeout: float = 600) -> str:
    """Run Python `code` (`args` as its sys.argv[1:]) in the aarch64 env under qemu; its stdout.
    RuntimeError with the guest's output where it fails."""
    proc = subprocess.run(guest_command(env) + ["-c", code, *args], env=_guest_env(env), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"aarch64 run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc.stdout


def run_artifact(library: str | Path, inputs: dict, env: Path = DEFAULT_ENV, timeout: float = 600) -> list:
    """Run the aarch64 artifact `library` on `inputs` (name -> numpy array) under qemu; its outputs."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        inputs_path, outputs_path = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(inputs_path, **inputs)
        stdout = run_python(_GUEST, str(library), str(inputs_path), str(outputs_path), env=env, timeout=timeout)
        report = json.loads(stdout.strip().splitlines()[-1])
        if report["machine"] != "aarch64":
            raise RuntimeError(f"the guest reported machine {report['machine']}, not aarch64")
        with np.load(outputs_path) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]


def setup(env: Path = DEFAULT_ENV) -> dict:
    """Download and unpack the Debian arm64 python and the aarch64 wheels into `env`."""
    if _qemu() is None:
        raise QemuEnvMissing("qemu-aarch64 is not installed: apt-get install -y qemu-user")
    env.mkdir(parents=True, exist_ok=True)
    apt = env / "apt"
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "debs"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        shutil.copy(sources, apt / "sources.list.d" / "debian.sources")
    else:
        (apt / "sources.list.d" / "debian.list").write_text(
            "deb http://deb.debian.org/debian bookworm main\n"
            "deb http://deb.debian.org/debian-security bookworm-security main\n"
        )
    # A private apt state for arm64 only: the system's apt configuration is left untouched.
    (apt / "apt.conf").write_text(
        'APT::Architecture "arm64";\nAPT::Architectures { "arm64"; };\n'
        f'Dir::State::Lists "{apt}/lists";\nDir::State::status "{apt}/status";\nDir::Cache "{apt}/cache";\n'
        f'Dir::Etc::SourceList "/dev/null";\nDir::Etc::SourceParts "{apt}/sources.list.d";\n'
        'Dir::Etc::Preferences "/dev/null";\nDir::Etc::PreferencesParts "/dev/null";\n'
    )
    apt_env = {**os.environ, "APT_CONFIG": str(apt / "apt.conf")}
    subprocess.run(["apt-get", "-q", "update"], env=apt_env, check=True)
    for old in (apt / "debs").glob("*.deb"):
        old.unlink()
    subprocess.run(["apt-get", "-q", "download", *DEBIAN_PACKAGES], env=apt_env, cwd=apt / "debs", check=True)
    sysroot = env / "sysroot"
    shutil.rmtree(sysroot, ignore_errors=True)
    for deb in sorted((apt / "debs").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(sysroot)], check=True)

    versions = {name: metadata.version(name) for name in WHEELS}
    wheels = env / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--python-version", "3.11",
           "--implementation", "cp", "-d", str(wheels)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={v}" for n, v in versions.items()], check=True)
    site = env / "site"
    shutil.rmtree(site, ignore_errors=True)
    import zipfile

    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    for so in site.rglob("*.so*"):  # zipfile drops the mode bits
        so.chmod(0o755)
    info = {"python": PYTHON, "versions": versions, "debian": DEBIAN_PACKAGES}
    (env / "env.json").write_text(json.dumps(info, indent=2))
    proc = subprocess.run(
        guest_command(env) + ["-c", "import platform, tvm; print(platform.machine(), tvm.__version__)"],
        env=_guest_env(env), capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the aarch64 env does not import tvm:\n{proc.stderr[-3000:]}")
    print("aarch64 env ready:", proc.stdout.strip())
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="env directory (default %(default)s)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="download the aarch64 python + wheels")
    sub.add_parser("check", help="is the env usable?")
    run = sub.add_parser("run", help="run an aarch64 artifact")
    run.add_argument("library")
    run.add_argument("--inputs", required=True, help=".npz with one array per input name")
    run.add_argument("-o", "--output", required=True, help=".npz to write the outputs to (arr_0, arr_1, ...)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "setup":
            setup(args.env)
        elif args.cmd == "check":
            print(json.dumps(check(args.env), indent=2))
        else:
            import numpy as np

            with np.load(args.inputs) as f:
                inputs = {k: f[k] for k in f.files}
            outputs = run_artifact(args.library, inputs, args.env)
            np.savez(args.output, *outputs)
            print(f"{len(outputs)} output(s) written to {args.output}")
    except QemuEnvMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
