#!/usr/bin/env python
"""Run a model repository on the `tritonserver` binary bundled in the `nvidia-pytriton` wheel (no container, no GPU).

    python scripts/triton_local.py --setup             # .venv-triton: pytriton, numpy < 2, star-export (idempotent)
    python scripts/triton_local.py REPO [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

A REPO run sets .venv-triton up first where it is missing.

What makes the bundled binary work here (found by trying):
- the Python backend's stub for this interpreter's version is copied next to `libtriton_python.so` in a backend folder
  of our own (`--backend-directory`);
- the stub links against `nvidia_pytriton.libs` (libcudart etc.) and this interpreter's libpython: both go first on
  `LD_LIBRARY_PATH` (a pyenv-built Python otherwise loads the system libpython and every model fails);
- the stub is built against numpy 1.x: under numpy 2 its BYTES tensors arrive corrupted, so `model.py` runs in
  `.venv-triton` (numpy < 2), put first on `PATH` (the stub finds its site-packages from there, not from PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-triton"


def setup(python: str | None = None) -> None:
    """Create .venv-triton (idempotent): the environment Triton's Python-backend stub runs model.py in. The stub
    bundled in nvidia-pytriton is built against numpy 1.x (under numpy 2 its BYTES tensors arrive corrupted), so it
    pins numpy < 2; torch goes in first as torch==2.13.0 (the CPU wheel, as scripts/setup.sh does)."""
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    if not (VENV / "bin" / "python").is_file():
        subprocess.run([python or os.environ.get("PYTHON", "python3"), "-m", "venv", str(VENV)], check=True)
    for args in (["--upgrade", "pip"], ["torch==2.13.0"], ["numpy<2", "nvidia-pytriton>=0.7", "-e", str(ROOT)]):
        subprocess.run(pip + args, check=True)


def site_packages(venv: Path = VENV) -> Path:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    if not found or not (found[0] / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        raise SystemExit(f"no pytriton in {venv}: run `python scripts/triton_local.py --setup` first")
    return found[0]


def command(repo: Path, http: int, grpc: int, metrics: int, workdir: Path) -> tuple[list[str], dict]:
    site = site_packages()
    server = site / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = workdir / "backends"
    (backends / "python").mkdir(parents=True, exist_ok=True)
    for f in (server / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, backends / "python" / f.name)
    stub = backends / "python" / "triton_python_backend_stub"
    shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    for exe in (stub, server / "bin" / "tritonserver"):
        exe.chmod(0o755)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"), str(site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")]))
    # The stub's embedded interpreter ignores PYTHONPATH; it takes its site-packages from the `python` first on PATH
    # (measured: with .venv activated it loaded .venv's numpy 2), so .venv-triton goes first there.
    env["PATH"] = os.pathsep.join([str(VENV / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(VENV)
    env.pop("PYTHONHOME", None)
    env["ORT_DISABLE_TELEMETRY"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    argv = [str(server / "bin" / "tritonserver"), "--model-repository", str(Path(repo).resolve()), "--backend-directory", str(backends),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-verbose", "0", "--exit-timeout-secs", "10",
            "--allow-gpu-metrics", "false", "--exit-on-error", "true"]
    return argv, env


def start(repo: Path, http: int, grpc: int, metrics: int, log: Path, timeout: float = 180) -> subprocess.Popen:
    """Start tritonserver and wait until it reports ready (HTTP /v2/health/ready); raises if it exits first."""
    workdir = Path(tempfile.mkdtemp(prefix="triton-"))
    argv, env = command(repo, http, grpc, metrics, workdir)
    out = open(log, "w")
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{Path(log).read_text()[-3000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo", type=Path, nargs="?", help="model repository to serve")
    p.add_argument("--setup", action="store_true", help="create or update .venv-triton and exit")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    args = p.parse_args()
    if args.setup or not (VENV / "bin" / "python").is_file():
        setup()
        if args.setup:
            return 0
    if args.repo is None:
        p.error("give the model repository to serve, or --setup")
    argv, env = command(args.repo, args.http_port, args.grpc_port, args.metrics_port, Path(tempfile.mkdtemp(prefix="triton-")))
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    sys.exit(main())
