"""``ASOBA_BACKEND=vllm`` with a fake vLLM child (tests/server/fake_vllm.py): the server's real
child management starts it on a unix socket, waits for it, proxies to it, watches and stops it.
No vLLM needed; each server here starts in a second or two."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from remote_service.api.monitor import MonitorStatus
from remote_service.engine.base import EngineLoadError
from remote_service.engine.vllm_child import VLLM_MODULE, plan_vllm
from remote_service.metrics import merge_exposition
from remote_service.settings import Settings
from tests.server.support import API_KEY, MODEL_NAME, ServerProcess, StartServer
from tests.server.test_process import run_main

FAKE = Path(__file__).with_name("fake_vllm.py")
GIB = 1024**3


def fake_python(where: Path) -> Path:
    """An ASOBA_VLLM_PYTHON that runs the fake with the argv vLLM's python would get."""
    path = where / "python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    path.chmod(0o755)
    return path


def model_dir(where: Path) -> Path:
    path = where / "model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


@dataclass
class Fake:
    dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def record(self) -> Path:
        return self.dir / "record.json"

    @property
    def events(self) -> Path:
        return self.dir / "events.log"

    def recorded(self, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.record.exists() or not self.record.read_text():
            assert time.monotonic() < deadline, "the fake child never started"
            time.sleep(0.05)
        data: dict[str, Any] = json.loads(self.record.read_text())
        return data

    def event_lines(self) -> list[str]:
        return self.events.read_text().splitlines() if self.events.exists() else []


def make_fake(where: Path, **env: str) -> Fake:
    fake = Fake(where)
    fake.env = {
        "ASOBA_BACKEND": "vllm",
        "ASOBA_VLLM_PYTHON": str(fake_python(where)),
        "ASOBA_MODEL_DIR": str(model_dir(where)),
        "ASOBA_MODEL_NAME": MODEL_NAME,
        "ASOBA_DEVICE": "cpu",
        "FAKE_VLLM_RECORD": str(fake.record),
        "FAKE_VLLM_EVENTS": str(fake.events),
        **env,
    }
    return fake


def pid_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is gone, only unreaped
            return True
        time.sleep(0.05)
    return False


def health(server: ServerProcess) -> httpx.Response:
    return httpx.get(server.base_url + "/health", timeout=5)


def wait_health_status(server: ServerProcess, word: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            body: dict[str, Any] = health(server).json()
            if body["status"] == word:
                return body
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"/health never said {word}:\n{server.log()}"
        time.sleep(0.05)


# --- one server for the request tests --------------------------------------------------------


@dataclass
class Served:
    server: ServerProcess
    fake: Fake
    while_loading: dict[str, Any]


@pytest.fixture(scope="module")
def served(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> Served:
    fake = make_fake(
        tmp_path_factory.mktemp("vllm"),
        ASOBA_MAX_MODEL_LEN="512",
        ASOBA_MAX_NUM_SEQS="8",
        ASOBA_MAX_REQUEST_BYTES="2048",
        ASOBA_DEFAULT_MAX_TOKENS="5",
        ASOBA_MAX_NEW_TOKENS="200",
        ASOBA_KV_CACHE_BYTES=str(int(1.5 * GIB)),
        ASOBA_GPU_MEMORY_UTILIZATION="0.5",
        ASOBA_VLLM_ENFORCE_EAGER="on",
        FAKE_VLLM_READY_DELAY="1.5",
        FAKE_VLLM_TOKEN_DELAY="0.05",
    )
    server = start_server(fake.env, wait=False, api_key=API_KEY)
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while "health" not in seen:  # the first answer of the front, while the child starts
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() < deadline, server.log()
        try:
            r = health(server)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen["health"] = (r.status_code, r.json())
        st = httpx.get(server.base_url + "/status", timeout=5)
        seen["status"] = (st.status_code, st.json())
        v1 = httpx.get(server.base_url + "/v1/models", headers={"X-API-Key": API_KEY}, timeout=5)
        seen["v1"] = (v1.status_code, v1.json(), v1.headers.get("retry-after"))
    server.wait_ready(timeout=30)
    return Served(server, fake, seen)


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with served.server.client(timeout=30) as c:
        yield c


def test_health_is_loading_until_the_child_answers_then_ok(served: Served) -> None:
    seen = served.while_loading
    assert seen["health"] == (503, {"status": "loading"})
    assert seen["status"][0] == 503 and seen["status"][1]["status"] == "loading"
    code, body, retry_after = seen["v1"]
    assert code == 503 and body["error"]["type"] == "service_unavailable"
    assert retry_after is not None and int(retry_after) >= 1
    r = health(served.server)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_the_child_gets_vllms_argv_and_env(served: Served) -> None:
    got = served.fake.recorded()
    argv: list[str] = got["argv"]
    assert argv[:2] == ["-m", VLLM_MODULE]

    def arg(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert arg("--model") == served.fake.env["ASOBA_MODEL_DIR"]
    assert arg("--served-model-name") == MODEL_NAME
    sock = Path(arg("--uds"))
    assert sock.is_socket()
    assert (sock.parent.stat().st_mode & 0o077) == 0  # only the service user opens it
    assert (arg("--max-model-len"), arg("--max-num-seqs")) == ("512", "8")
    assert arg("--tensor-parallel-size") == "1"
    assert arg("--dtype") == "auto" and arg("--generation-config") == "vllm"
    assert "--enforce-eager" in argv  # ASOBA_VLLM_ENFORCE_EAGER=on
    assert "--gpu-memory-utilization" not in argv  # CUDA only
    env = got["env"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # 1.5 GiB, rounded up to whole GiB
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "--model" in served.server.log()  # the argv is logged once


def test_v1_is_proxied_as_vllm_answers(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == 512
    r = client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3, "n": 2, "logprobs": 1},
        headers={"X-Request-Id": "mine-1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " t0 t1 t2"
    assert r.headers["x-request-id"] == "mine-1"
    assert len(r.headers.get_list("date")) == 1 and len(r.headers.get_list("server")) <= 1
    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.json()["choices"][0]["message"]["content"] == " t0 t1"
    missing = client.post("/v1/completions", json={"model": "other", "prompt": "x"})
    assert missing.status_code == 404  # vLLM's own answer, passed on
    assert client.get("/v1/no-such-route").status_code == 404


def test_a_stream_arrives_chunk_by_chunk(client: httpx.Client) -> None:
    body = {"prompt": "hi", "max_tokens": 20, "stream": True}  # 20 x 0.05 s in the fake
    started = time.monotonic()
    first_at = None
    data = b""
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            if first_at is None:
                first_at = time.monotonic() - started
            data += chunk
    total = time.monotonic() - started
    assert first_at is not None and first_at < 0.6, first_at
    assert total > 0.9 and first_at < total - 0.5  # not buffered until the end
    assert data.endswith(b"data: [DONE]\n\n") and data.count(b"data: {") == 20
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=chat) as r:
        assert b"".join(r.iter_raw()).count(b"chat.completion.chunk") == 3


def test_a_client_that_leaves_mid_stream_closes_the_upstream(
    served: Served, client: httpx.Client
) -> None:
    body = {"prompt": "hi", "max_tokens": 150, "stream": True}  # ~7 s in the fake
    with client.stream(
        "POST", "/v1/completions", json=body, headers={"X-Request-Id": "leaver-1"}
    ) as r:
        chunks = r.iter_raw()
        next(chunks)
        next(chunks)
    deadline = time.monotonic() + 5
    while "stream-closed leaver-1" not in served.fake.event_lines():
        assert time.monotonic() < deadline, served.fake.event_lines()
        time.sleep(0.05)


def test_the_api_key_guards_v1_and_generate_not_health(served: Served) -> None:
    with served.server.client(auth=False) as anon:
        assert anon.get("/v1/models").status_code == 401
        assert anon.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert anon.post("/generate", json={"prompt": "x"}).status_code == 401
        assert anon.get("/health").status_code == 200
        assert anon.get("/status").status_code == 200
        assert anon.get("/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200
        wrong = anon.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def test_the_body_cap_answers_413_before_the_child_sees_it(
    served: Served, client: httpx.Client
) -> None:
    big = json.dumps({"prompt": "x" * 4000, "max_tokens": 1, "marker": "big-1"})
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunked() -> Iterator[bytes]:
        yield big[:1000].encode()
        yield big[1000:].encode()

    r = client.post("/v1/completions", content=chunked())
    assert r.status_code == 413
    assert not any("big-1" in line for line in served.fake.event_lines())


def test_generate_maps_to_the_childs_completions(served: Served, client: httpx.Client) -> None:
    body = {"prompt": "aa b ccc", "max_tokens": 3, "temperature": 0, "stop": ["zz"], "seed": 7}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"] == [{"text": " t0 t1 t2", "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert out["model"] == MODEL_NAME and out["id"].startswith("gen-")
    sent = [
        json.loads(line.split(" ", 2)[2])
        for line in served.fake.event_lines()
        if line.startswith(f"completion {out['id']} ")
    ]
    assert len(sent) == 1
    assert sent[0]["prompt"] == [2, 1, 3]  # the fake's token ids: word lengths
    assert sent[0]["max_tokens"] == 3 and sent[0]["temperature"] == 0
    assert sent[0]["top_p"] == 1.0 and sent[0]["stop"] == ["zz"] and sent[0]["seed"] == 7
    assert sent[0]["model"] == MODEL_NAME and sent[0]["stream"] is True
    default = client.post("/generate", json={"prompt": "a"}).json()
    assert default["usage"]["completion_tokens"] == 5  # ASOBA_DEFAULT_MAX_TOKENS
    assert client.post("/generate", json={"prompt": "a", "max_tokens": 201}).status_code == 400


def test_status_keeps_the_monitors_shape_and_names_the_engine(client: httpx.Client) -> None:
    r = client.get("/status")
    assert r.status_code == 200
    body = r.json()
    MonitorStatus.model_validate(body, strict=True)
    assert list(body)[:8] == list(MonitorStatus.model_fields)
    assert body["status"] == "healthy" and body["model"] == MODEL_NAME
    assert body["engine"] == "vllm" and body["backend"] == "vllm"
    assert body["device"] == "cpu" and body["max_model_len"] == 512
    assert body["load_time_s"] > 0
    info = client.get("/").json()
    assert info["versions"]["vllm"] == "0.0-fake"


def test_status_counts_the_tokens_vllm_made(client: httpx.Client) -> None:
    before = client.get("/status").json()
    r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 6})
    assert r.status_code == 200
    after = client.get("/status").json()
    assert after["tokens_generated"] == before["tokens_generated"] + 6  # vLLM's own counter
    assert after["tokens_per_s"] > 0  # its rate since the earlier call
    assert after["requests_waiting"] == 2  # vLLM's queue (the fake says 2)


def test_metrics_are_ours_then_the_childs_without_duplicate_families(
    client: httpx.Client,
) -> None:
    text = client.get("/metrics").text
    assert "asoba:num_requests_running" in text
    assert 'vllm:num_requests_running{model_name="demo-tiny"}' in text
    assert "process_cpu_seconds_total 1.5" not in text  # the child's process figures
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))


# --- servers of their own: failures and stopping ---------------------------------------------


def test_a_child_that_exits_at_start_is_reported_and_the_server_exits(
    start_server: StartServer, tmp_path: Path
) -> None:
    fake = make_fake(tmp_path, FAKE_VLLM_EXIT_AT_START="RuntimeError: fake CUDA out of memory")
    server = start_server(fake.env, wait=False)
    body = wait_health_status(server, "error")
    assert "exited with status 1" in body["detail"]
    assert "fake CUDA out of memory" in body["detail"]  # the child's last lines
    status = httpx.get(server.base_url + "/status", timeout=5)
    assert status.status_code == 503 and status.json()["status"] == "error"
    assert server.proc.wait(timeout=20) == 3  # not 2: systemd's Restart= applies
    log = server.log()
    assert "fake CUDA out of memory" in log  # forwarded to the journal as it was
    assert "exiting with status 3" in log


def test_a_child_killed_later_is_reported_and_the_server_exits(
    start_server: StartServer, tmp_path: Path
) -> None:
    fake = make_fake(tmp_path)
    server = start_server(fake.env)
    pid = fake.recorded()["pid"]
    os.kill(pid, signal.SIGKILL)
    body = wait_health_status(server, "error")
    assert "killed by SIGKILL" in body["detail"]
    assert httpx.get(server.base_url + "/health/live", timeout=5).status_code == 200
    assert server.proc.wait(timeout=20) == 3


def test_a_child_not_ready_in_time_is_stopped_and_the_server_exits(
    start_server: StartServer, tmp_path: Path
) -> None:
    fake = make_fake(tmp_path, FAKE_VLLM_READY_DELAY="600", ASOBA_VLLM_START_TIMEOUT="1")
    server = start_server(fake.env, wait=False)
    body = wait_health_status(server, "error")
    assert "not ready within ASOBA_VLLM_START_TIMEOUT=1s" in body["detail"]
    assert server.proc.wait(timeout=30) == 3
    assert pid_gone(fake.recorded()["pid"])


def test_sigterm_drains_then_stops_the_child(start_server: StartServer, tmp_path: Path) -> None:
    fake = make_fake(tmp_path, FAKE_VLLM_TOKEN_DELAY="0.05", ASOBA_SHUTDOWN_TIMEOUT="5")
    server = start_server(fake.env)
    got = fake.recorded()
    pid, sock = got["pid"], Path(got["argv"][got["argv"].index("--uds") + 1])
    body = b""
    with server.client() as c:
        payload = {"prompt": "x", "max_tokens": 20, "stream": True}  # ~1 s
        with c.stream("POST", "/v1/completions", json=payload) as r:
            chunks = r.iter_raw()
            body += next(chunks)
            server.proc.send_signal(signal.SIGTERM)
            for chunk in chunks:
                body += chunk
    assert body.endswith(b"data: [DONE]\n\n")  # the request in flight was finished
    code = server.proc.wait(timeout=30)
    assert code in (0, -signal.SIGTERM)
    assert pid_gone(pid), "the vLLM child outlived the server"
    assert not sock.parent.exists()  # the private socket dir is removed
    assert "stopping vLLM" in server.log()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({}, "error: ASOBA_VLLM_PYTHON is required with ASOBA_BACKEND=vllm"),
        ({"ASOBA_VLLM_PYTHON": "/nonexistent/python"}, "is not an executable file"),
        ({"ASOBA_MODEL_DIR": "/nonexistent/model"}, "has no config.json"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path: Path, env: dict[str, str], line: str) -> None:
    base = {
        "ASOBA_BACKEND": "vllm",
        "ASOBA_MODEL_DIR": str(model_dir(tmp_path)),
        "ASOBA_DEVICE": "cpu",
    }
    if env:
        base["ASOBA_VLLM_PYTHON"] = str(fake_python(tmp_path))
    proc = run_main({**base, **env})
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0] and lines[0].startswith("error: ")


# --- the plan: argv and environment for each host --------------------------------------------


def plan(
    tmp_path: Path,
    *,
    gpus: int = 0,
    cxx: bool = True,
    environ: dict[str, str] | None = None,
    cpus: int = 4,
    **kw: Any,
) -> Any:
    kw.setdefault("vllm_socket", tmp_path / "s.sock")
    settings = Settings(
        backend="vllm",
        vllm_python=fake_python(tmp_path),
        model_dir=model_dir(tmp_path),
        model_name="m",
        **kw,
    )
    return plan_vllm(
        settings,
        {"PATH": "/usr/bin", **(environ or {})},
        gpu_count=lambda: gpus,
        has_cxx=lambda _: cxx,
        usable_cpus=lambda: cpus,
    )


def test_plan_on_cuda_passes_gpu_memory_and_kv_bytes(tmp_path: Path) -> None:
    p = plan(tmp_path, gpus=1, gpu_memory_utilization=0.8, kv_cache_bytes=3 * GIB, cxx=False)
    assert p.device == "cuda"
    assert p.argv[p.argv.index("--gpu-memory-utilization") + 1] == "0.8"
    assert p.argv[p.argv.index("--kv-cache-memory-bytes") + 1] == str(3 * GIB)
    assert "VLLM_CPU_KVCACHE_SPACE" not in p.env
    assert "--enforce-eager" not in p.argv  # auto: compiled on CUDA
    assert "--max-model-len" not in p.argv  # vLLM takes the model's own
    # vLLM's own executor choice and thread count on CUDA
    assert "--distributed-executor-backend" not in p.argv
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in p.env and "OMP_NUM_THREADS" not in p.env


def test_plan_on_cpu(tmp_path: Path) -> None:
    p = plan(tmp_path, gpu_memory_utilization=0.8, kv_cache_bytes=GIB + 1, max_model_len=1024)
    assert p.device == "cpu" and "--gpu-memory-utilization" not in p.argv
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == str(math.ceil((GIB + 1) / GIB))
    assert plan(tmp_path, kv_cache_bytes=1).env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in plan(tmp_path).env
    assert p.argv[p.argv.index("--max-model-len") + 1] == "1024"
    assert "--enforce-eager" not in p.argv  # a compiler is there
    no_cxx = plan(tmp_path, cxx=False)
    assert "--enforce-eager" in no_cxx.argv and "C++ compiler" in no_cxx.eager_reason
    # and nothing is compiled on first use either (the logprob helper would need g++)
    assert no_cxx.env["TORCHDYNAMO_DISABLE"] == "1"
    assert "TORCHDYNAMO_DISABLE" not in plan(tmp_path, cxx=True).env
    assert "--enforce-eager" not in plan(tmp_path, cxx=False, vllm_enforce_eager="off").argv
    assert "--enforce-eager" in plan(tmp_path, gpus=1, vllm_enforce_eager="on").argv


def test_plan_on_cpu_runs_the_model_in_the_engine_process(tmp_path: Path) -> None:
    p = plan(tmp_path, cpus=4)
    assert p.argv[p.argv.index("--distributed-executor-backend") + 1] == "uni"
    assert p.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert p.env["OMP_NUM_THREADS"] == "3"  # one CPU left to the event loops
    assert plan(tmp_path, cpus=1).env["OMP_NUM_THREADS"] == "1"
    # a thread count the unit or the operator set is theirs
    assert "OMP_NUM_THREADS" not in plan(tmp_path, environ={"OMP_NUM_THREADS": "8"}).env


def test_plan_devices_and_quantization(tmp_path: Path) -> None:
    assert plan(tmp_path, device="cuda:1").env["CUDA_VISIBLE_DEVICES"] == "1"
    assert plan(tmp_path, device="cuda", gpus=0).device == "cuda"  # as told
    tp = plan(tmp_path, device="auto", gpus=2, tensor_parallel_size=2).argv
    assert tp[tp.index("--tensor-parallel-size") + 1] == "2"
    awq = plan(tmp_path, gpus=1, quantization="awq")
    assert "--quantization" not in awq.argv  # vLLM reads it from the checkpoint's config
    bnb = plan(tmp_path, gpus=1, quantization="bnb-4bit")
    assert bnb.argv[bnb.argv.index("--quantization") + 1] == "bitsandbytes"
    for kw in (
        {"gpus": 1, "quantization": "bnb-8bit"},
        {"tensor_parallel_size": 2},
        {"device": "cuda:0", "tensor_parallel_size": 2},
    ):
        with pytest.raises(EngineLoadError):
            plan(tmp_path, **kw)
    with pytest.raises(EngineLoadError, match="longer than"):
        plan(tmp_path, vllm_socket=tmp_path / ("x" * 120))


def test_plan_passes_the_models_tool_call_parser(tmp_path: Path) -> None:
    argv = plan(tmp_path, gpus=1, vllm_tool_call_parser="hermes").argv
    assert "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    assert "--tool-call-parser" not in plan(tmp_path).argv  # none: vLLM refuses tool_choice
    with pytest.raises(ValueError, match="vllm_tool_call_parser"):
        Settings(vllm_tool_call_parser="hermes --trust-remote-code")


def test_default_socket_is_in_the_runtime_directory(tmp_path: Path) -> None:
    settings = Settings(
        backend="vllm", vllm_python=fake_python(tmp_path), model_dir=model_dir(tmp_path)
    )
    env = {"RUNTIME_DIRECTORY": str(tmp_path)}
    p = plan_vllm(settings, env, gpu_count=lambda: 0, has_cxx=lambda _: True)
    assert p.socket == tmp_path / "vllm.sock" and not p.socket_dir_owned
    q = plan_vllm(settings, {}, gpu_count=lambda: 0, has_cxx=lambda _: True)
    assert q.socket_dir_owned and (q.socket.parent.stat().st_mode & 0o777) == 0o700
    q.socket.parent.rmdir()


def test_merge_exposition_drops_the_childs_duplicates() -> None:
    ours = b"# HELP a:x X\n# TYPE a:x counter\na:x_total 1.0\n"
    theirs = (
        b"# HELP a:x X\n# TYPE a:x counter\na:x_total 9.0\n"
        b"# TYPE process_open_fds gauge\nprocess_open_fds 3.0\n"
        b'# TYPE vllm:y gauge\nvllm:y{model_name="m"} 2.0\n'
    )
    merged = merge_exposition(ours, theirs).decode()
    assert "a:x_total 1.0" in merged and "a:x_total 9.0" not in merged
    assert "process_open_fds" not in merged and 'vllm:y{model_name="m"} 2.0' in merged
    assert merge_exposition(ours, b"") == ours
