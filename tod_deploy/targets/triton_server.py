"""Start a real Triton Inference Server on a model repository, wait until it is ready, stop it cleanly.

The server is ``tritonserver`` from the ``serve`` extra (nvidia-pytriton bundles the binary and
its Python backend; it runs on CPU-only machines) or, failing that, one on PATH with its backends
in ``/opt/tritonserver/backends`` (NVIDIA's container). The Python backend's stub runs the
interpreter it finds first on PATH, so ours goes first: the python models then import the same
tod-deploy and onnxruntime as this process.

Errors are the user's to fix, so they come back as one line: a model whose backend this server
lacks ("backend not found": the bundle has only the python backend) names the model, the backend
and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tod_deploy.errors import UserError

READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        """Three ports free on loopback now (tests and benchmarks start servers side by side)."""
        sockets = [socket.socket() for _ in range(3)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()

    def endpoints(self, host: str = "localhost") -> dict[str, str]:
        return {
            "http": f"http://{host}:{self.http}",
            "grpc": f"{host}:{self.grpc}",
            "metrics": f"http://{host}:{self.metrics}/metrics",
        }


@dataclass(frozen=True)
class Installation:
    """A tritonserver binary, its backends folder, and the shared libraries it needs."""

    binary: Path
    backends: Path
    libraries: Path | None
    python_stub: Path | None  # the bundle's stub for this Python version (placed beside the backend)
    source: str


def find_tritonserver() -> Installation:
    """The bundled server (serve extra) first, else ``tritonserver`` on PATH."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported: only its files are used
    if spec is not None and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        libs = package.parent / "nvidia_pytriton.libs"
        if (root / "bin" / "tritonserver").is_file():
            return Installation(
                root / "bin" / "tritonserver",
                root / "backends",
                libs if libs.is_dir() else None,
                stub if stub.is_file() else None,
                "nvidia-pytriton's bundled tritonserver",
            )
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), Path("/opt/tritonserver/backends"), None, None, on_path)
    raise UserError(
        "no Triton Inference Server found (neither the serve extra's bundle nor tritonserver on PATH)",
        "pip install 'tod-deploy[serve]', or run inside NVIDIA's tritonserver container",
    )


@dataclass
class TritonServer:
    """One ``tritonserver`` process on ``repository`` (a context manager: stopped on exit, always)."""

    repository: Path
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    _workdir: Path | None = None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> TritonServer:
        """Start the server and return once every model is ready; one-line errors otherwise."""
        if not self.repository.is_dir():
            raise UserError(f"{self.repository} is not a folder", "pass a repository written by tod-deploy package")
        install = find_tritonserver()
        self._workdir = Path(tempfile.mkdtemp(prefix="tod-triton-"))
        self.log_path = self.log_path or self._workdir / "tritonserver.log"
        command = [
            str(install.binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={self._backends(install)}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
        ]
        with open(self.log_path, "wb") as log:
            # its own process group: stopping it stops the Python-backend stubs it started too
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self._environment(install), start_new_session=True
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _backends(self, install: Installation) -> Path:
        """A backends folder whose python backend carries the stub for this Python (the bundle keeps one
        stub per Python version beside it); other backends are linked as they are."""
        if install.python_stub is None:
            return install.backends
        assert self._workdir is not None
        backends = self._workdir / "backends"
        for backend in install.backends.iterdir():
            if backend.is_dir():
                (backends / backend.name).mkdir(parents=True)
                for item in backend.iterdir():
                    (backends / backend.name / item.name).symlink_to(item)
        (backends / "python" / "triton_python_backend_stub").symlink_to(install.python_stub)
        return backends

    @staticmethod
    def _environment(install: Installation) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["TOD_DEPLOY_SITE_PACKAGES"] = os.pathsep.join(site_folders())
        if install.libraries is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (env.get("LD_LIBRARY_PATH"), str(install.libraries)) if p
            )
        return env

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(*startup_failure(self.log_text(), self.process.returncode))
            try:
                url = f"http://{self.host}:{self.ports.http}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise UserError(
            f"tritonserver did not become ready within {timeout_s:.0f} s (log: {self.log_path})",
            "read the log; a large model may need --timeout",
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.is_file() else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGINT (Triton drains in-flight requests), then SIGKILL to the whole group after ``grace_s``."""
        process, self.process = self.process, None
        if process is not None:
            for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
                if process.poll() is not None:
                    break
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
            try:  # stubs left in the group (a killed server cannot reap them)
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._workdir is not None:  # the log stays for the user to read; the links go
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def site_folders() -> list[str]:
    """This interpreter's package folders (a venv's, then the base's): what the python models import from."""
    folders = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return [f for f in dict.fromkeys(folders) if Path(f).is_dir()]


_FAILED_MODEL = re.compile(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"|$)")
_NO_BACKEND = re.compile(r"unable to find backend library for backend '([^']+)'|backend '([^']+)' not found", re.I)


def startup_failure(log: str, returncode: int | None) -> tuple[str, str]:
    """The one line and its fix for a server that exited while starting (from its log)."""
    failures = _FAILED_MODEL.findall(log)
    for model, reason in failures:
        missing = _NO_BACKEND.search(reason)
        if missing:
            backend = missing.group(1) or missing.group(2)
            return (
                f"model {model!r} needs Triton's {backend!r} backend, which this tritonserver does not have "
                f"(backend not found)",
                "serve it on a Triton build with that backend (NVIDIA's tritonserver container), "
                "or re-package with --backend python",
            )
    if failures:
        model, reason = failures[0]
        return f"model {model!r} failed to load: {reason.strip()}", "fix the model or re-package it"
    if "Address already in use" in log or "address in use" in log.lower():
        return "a port tritonserver needs is already in use", "pass other --http-port/--grpc-port/--metrics-port"
    last = next((line for line in reversed(log.splitlines()) if line.strip()), "no output")
    return f"tritonserver exited with status {returncode} while starting ({last.strip()})", "read its log"
