"""``ASOBA_BACKEND=vllm``: vLLM's own OpenAI server as a child process on a unix socket.

Why a child server and not vLLM in-process (``AsyncLLM``):

- **Its own venv.** vLLM pins its own torch, transformers and fastapi; they live in
  ``ASOBA_VLLM_PYTHON``'s venv, apart from the front's lock, and neither upgrade breaks the
  other.
- **Failure is visible.** An engine crash (CUDA error, OOM, a bug) is a child exit the front
  sees: ``/health``, ``/status`` and ``/metrics`` keep answering with the exit status and the
  child's last lines, then the front exits non-zero so systemd restarts the unit.
- **vLLM's whole API.** ``n``, logprobs, tools, ``response_format``/JSON schema, prompt lists,
  ``/v1/models`` with ``max_model_len``: served as vLLM serves them, not re-implemented.

Why a unix socket and not a loopback port: the unit allows binding only the service port
(``SocketBindAllow``/``SocketBindDeny``); the socket file lives in a directory only the service
user can open (``$RUNTIME_DIRECTORY`` or a fresh 0700 temp dir), so no other local user can
reach the child, which has no authentication of its own.

This module decides the child's command line and environment (:func:`plan_vllm`, pure, checked
before the server starts: a setting that cannot work is exit status 2) and runs it
(:class:`ChildProcess`: a new process group, output forwarded line by line to the front's own
stdout/stderr and the last lines kept for ``/health``; stop is SIGTERM to the group, a grace,
then SIGKILL). The front never imports vllm.

Quantization: an AWQ/GPTQ checkpoint says so in its ``config.json`` and vLLM detects it, so
``ASOBA_QUANTIZATION=awq`` passes nothing; ``bnb-4bit`` is vLLM's in-flight bitsandbytes
(``--quantization bitsandbytes``); vLLM has no in-flight 8-bit, so ``bnb-8bit`` is refused.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from remote_service.engine.base import EngineLoadError
from remote_service.settings import Settings

log = logging.getLogger(__name__)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
GIB = 1024**3
TAIL_LINES = 20
_MAX_LINE = 64 * 1024  # a line longer than this is forwarded in pieces
_TAIL_LINE_CHARS = 400
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the NUL
_CXX_COMPILERS = ("c++", "g++", "clang++")


@dataclass(frozen=True)
class VllmPlan:
    """How the child is started: argv, the environment it adds, where its socket is."""

    argv: list[str]
    env: dict[str, str]
    socket: Path
    socket_dir_owned: bool  # a temp dir made for it: removed after the child stops
    device: str  # "cpu" or "cuda"
    enforce_eager: bool
    eager_reason: str
    notes: list[str] = field(default_factory=list)


def _gpu_count() -> int:
    from remote_service.gpu import gpu_memory

    return gpu_memory().count


def _has_cxx(environ: Mapping[str, str]) -> bool:
    names = [environ["CXX"]] if environ.get("CXX") else list(_CXX_COMPILERS)
    path = environ.get("PATH")
    return any(shutil.which(name, path=path) for name in names)


def default_socket(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """``$RUNTIME_DIRECTORY/vllm.sock`` (systemd's ``RuntimeDirectory=``, 0700 by default),
    else a socket in a fresh private temp dir (True: the caller removes that dir)."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / "vllm.sock", False
    return Path(tempfile.mkdtemp(prefix="asoba-vllm-")) / "vllm.sock", True


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def plan_vllm(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    *,
    gpu_count: Callable[[], int] = _gpu_count,
    has_cxx: Callable[[Mapping[str, str]], bool] = _has_cxx,
    usable_cpus: Callable[[], int] = _usable_cpus,
    make_socket: bool = True,
) -> VllmPlan:
    """The child's command line for ``settings`` on this host; :class:`EngineLoadError`
    (one line) for a setting that cannot work. ``make_socket=False`` only checks (no temp
    dir is made for a default socket)."""
    env_in = os.environ if environ is None else environ
    python = settings.vllm_python
    if python is None:
        raise EngineLoadError("ASOBA_VLLM_PYTHON is required with ASOBA_BACKEND=vllm")
    if not python.is_file() or not os.access(python, os.X_OK):
        raise EngineLoadError(
            f"ASOBA_VLLM_PYTHON={python} is not an executable file "
            "(the python of the venv vLLM is installed in)"
        )
    model_dir = settings.model_dir
    if model_dir is None or not (model_dir / "config.json").is_file():
        raise EngineLoadError(f"ASOBA_MODEL_DIR={model_dir} has no config.json")

    device = settings.device
    if device == "auto":
        device = "cuda" if gpu_count() > 0 else "cpu"
    env: dict[str, str] = {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": env_in.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": env_in.get("TRANSFORMERS_OFFLINE", "1"),
    }
    if device.startswith("cuda:"):
        if settings.tensor_parallel_size > 1:
            raise EngineLoadError(
                f"ASOBA_DEVICE={device} names one GPU but ASOBA_TENSOR_PARALLEL_SIZE="
                f"{settings.tensor_parallel_size}; use ASOBA_DEVICE=cuda (or auto) and "
                "CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2]
    cuda = device != "cpu"
    if not cuda and settings.tensor_parallel_size > 1:
        raise EngineLoadError(
            f"ASOBA_TENSOR_PARALLEL_SIZE={settings.tensor_parallel_size} needs GPUs, "
            "but the device is cpu"
        )
    if settings.quantization == "bnb-8bit":
        raise EngineLoadError(
            "ASOBA_QUANTIZATION=bnb-8bit is not available with ASOBA_BACKEND=vllm "
            "(vLLM quantizes in flight to 4 bits only): use bnb-4bit or an AWQ checkpoint"
        )
    if settings.quantization != "none" and not cuda:
        raise EngineLoadError(
            f"ASOBA_QUANTIZATION={settings.quantization} needs a CUDA GPU, but the device "
            f"is cpu (ASOBA_DEVICE={settings.device}); use ASOBA_QUANTIZATION=none on this host"
        )

    if settings.vllm_enforce_eager == "on":
        eager, reason = True, "ASOBA_VLLM_ENFORCE_EAGER=on"
    elif settings.vllm_enforce_eager == "off":
        eager, reason = False, "ASOBA_VLLM_ENFORCE_EAGER=off"
    elif not cuda and not has_cxx(env_in):
        eager, reason = True, "CPU without a C++ compiler on PATH (inductor needs one)"
        # --enforce-eager covers the model; vLLM also compiles helpers on first use (the
        # logprob ranks), which would kill the engine at the first such request.
        env["TORCHDYNAMO_DISABLE"] = "1"
    else:
        eager, reason = False, "compiled (the default)"

    owned = False
    if settings.vllm_socket is not None:
        sock = settings.vllm_socket
        if not sock.parent.is_dir():
            raise EngineLoadError(
                f"ASOBA_VLLM_SOCKET={sock}: the directory {sock.parent} does not exist"
            )
    elif make_socket:
        sock, owned = default_socket(env_in)
    else:
        sock = Path(env_in.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/tmp") / "vllm.sock"
    if len(os.fsencode(sock)) > _SUN_PATH_MAX:
        raise EngineLoadError(
            f"the vLLM socket path {sock} is longer than {_SUN_PATH_MAX} bytes "
            "(set ASOBA_VLLM_SOCKET to a shorter one)"
        )

    argv = [
        str(python),
        "-m",
        VLLM_MODULE,
        "--model",
        str(model_dir),
        "--served-model-name",
        settings.served_model_name,
        "--uds",
        str(sock),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--dtype",
        settings.dtype,
        # The checkpoint's generation_config.json would silently change sampling defaults.
        "--generation-config",
        "vllm",
        # Request logging is off by default in vLLM; the front writes the access log.
        "--disable-uvicorn-access-log",
    ]
    if settings.max_model_len is not None:
        argv += ["--max-model-len", str(settings.max_model_len)]
    notes: list[str] = []
    if cuda:
        if settings.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
        if settings.kv_cache_bytes is not None:
            argv += ["--kv-cache-memory-bytes", str(settings.kv_cache_bytes)]
    else:
        if settings.gpu_memory_utilization is not None:
            notes.append("ASOBA_GPU_MEMORY_UTILIZATION is ignored on CPU")
        if settings.kv_cache_bytes is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(settings.kv_cache_bytes / GIB)))
        # The model runs in vLLM's engine process, not in a worker process of its own. With
        # the worker apart (what the CPU build picks), the engine's main thread waits for
        # each step by spinning on shared memory, giving up the GIL only for an instant at a
        # time, and the engine's threads that take requests in and send tokens out barely
        # get it: measured on 2 cores, 16 simultaneous requests ran one after another and
        # every token of a stream reached the client at its end (docs/benchmarks.md).
        # On CPU there is only one worker (tensor parallelism is refused above).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        argv += ["--distributed-executor-backend", "uni"]
        if "OMP_NUM_THREADS" not in env_in:
            # Compute threads on all CPUs but one: that one is for the Python event loops
            # (this front, vLLM's API server, the engine's I/O threads).
            env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() - 1))
    if settings.quantization == "bnb-4bit":
        argv += ["--quantization", "bitsandbytes"]
    if settings.vllm_tool_call_parser is not None:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", settings.vllm_tool_call_parser]
    if eager:
        argv.append("--enforce-eager")
    return VllmPlan(
        argv=argv,
        env=env,
        socket=sock,
        socket_dir_owned=owned,
        device="cuda" if cuda else "cpu",
        enforce_eager=eager,
        eager_reason=reason,
        notes=notes,
    )


class ChildProcess:
    """The running child: its output pumped to ours, its last lines kept, its group stopped."""

    def __init__(
        self,
        plan: VllmPlan,
        *,
        on_exit: Callable[[int], None],
        stdout: IO[bytes] | None = None,
        stderr: IO[bytes] | None = None,
    ) -> None:
        self.plan = plan
        self._on_exit = on_exit
        self._out = stdout if stdout is not None else sys.stdout.buffer
        self._err = stderr if stderr is not None else sys.stderr.buffer
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pumps: list[threading.Thread] = []
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def tail(self) -> list[str]:
        with self._tail_lock:
            return list(self._tail)

    def start(self, environ: Mapping[str, str] | None = None) -> None:
        sock = self.plan.socket
        if sock.is_socket() or sock.is_symlink():
            sock.unlink()  # left by a child that was killed: vLLM would fail to bind
        env = {**(os.environ if environ is None else environ), **self.plan.env}
        log.info("starting vLLM: %s", " ".join(self.plan.argv))
        self._proc = subprocess.Popen(
            self.plan.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stopped as one
            close_fds=True,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        for name, pipe, sink in (
            ("stdout", self._proc.stdout, self._out),
            ("stderr", self._proc.stderr, self._err),
        ):
            pump = threading.Thread(
                target=self._pump, args=(pipe, sink), name=f"vllm-{name}", daemon=True
            )
            pump.start()
            self._pumps.append(pump)
        threading.Thread(target=self._watch, name="vllm-watch", daemon=True).start()

    def _pump(self, pipe: IO[bytes], sink: IO[bytes]) -> None:
        with pipe:
            while line := pipe.readline(_MAX_LINE):
                with self._write_lock:
                    try:
                        sink.write(line)
                        sink.flush()
                    except (OSError, ValueError):
                        pass  # our own stdout is gone: keep draining the pipe
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.strip():
                    with self._tail_lock:
                        self._tail.append(text[:_TAIL_LINE_CHARS])

    def _watch(self) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        for pump in self._pumps:
            pump.join(timeout=2)  # its last words, before anyone reads the tail
        self._on_exit(code)

    def stop(self, grace: float) -> int | None:
        """SIGTERM the child's group, wait up to ``grace``, then SIGKILL it."""
        self.stopping = True
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            log.info("stopping vLLM (pid %d): SIGTERM, %.0fs grace", proc.pid, grace)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop in %.0fs: SIGKILL", grace)
        # The group may hold workers even after the leader exited.
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not deliver
            log.error("vLLM (pid %d) survived SIGKILL", proc.pid)
        for pump in self._pumps:
            pump.join(timeout=2)
        self._cleanup()
        return proc.returncode

    def _cleanup(self) -> None:
        sock = self.plan.socket
        try:
            if sock.is_socket():
                sock.unlink()
            if self.plan.socket_dir_owned:
                shutil.rmtree(sock.parent, ignore_errors=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", sock, exc)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def describe_exit(code: int, tail: Sequence[str]) -> str:
    """The reason ``/health`` gives for a child that exited."""
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    text = f"vLLM {how}"
    if tail:
        text += "; its last output:\n" + "\n".join(tail)
    return text
