"""The host probe: one remote command, its JSON, and the script run locally against fake tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deployer.config import RemoteConfig
from deployer.errors import CommandResult, ConnectError, ProbeError
from deployer.facts import HostFacts
from deployer.probe import PROBE_SCRIPT, inspect_host, probe_command, probe_script
from deployer.remote import probe_host
from tests.fakes import (
    PYTHON,
    FakeExecutor,
    block_pynvml,
    fake_pynvml,
    install_fake_nvidia_smi,
    is_probe,
    probe_answer,
    probe_json,
    run_locally,
)

REMOTE = RemoteConfig()
GPU_CSV = "0, GPU-a10a, NVIDIA A10G, 23028, 14512, 8516, 535.183.01\n"
APPS_CSV = "4242, /usr/bin/python3, 14000, GPU-a10a\n4343, python, [N/A], GPU-a10a\n"


# --------------------------------------------------------------------------- probe.py


def test_probe_is_one_command_with_the_script_and_settings() -> None:
    fake = FakeExecutor().on(is_probe, probe_answer(probe_json()))
    facts = inspect_host(fake, REMOTE)
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call.argv == (
        "python3",
        "-",
        "--models-dir",
        "/opt/models",
        "--state-file",
        "/var/lib/model-deployer/current.json",
        "--flux-unit",
        "flux-api.service",
        "--inference-unit",
        "asoba-inference.service",
        "--timeout",
        "10",
    )
    assert call.sudo is False and call.stdin == probe_script() and call.timeout == 30.0
    assert call.what == "host probe"
    assert facts.gpu.devices[0].name == "NVIDIA A10G"
    assert facts.flux.active and facts.flux.memory_bytes == 34_000_000_000


def test_probe_command_follows_remote_settings() -> None:
    remote = RemoteConfig(
        python="/usr/bin/python3.12",
        models_dir="/data/models",
        state_dir="/srv/md",
        flux_service="flux.service",
        service_name="llm.service",
    )
    argv = probe_command(remote)
    assert argv[0] == "/usr/bin/python3.12"
    assert argv[1:] == [
        "-",
        "--models-dir",
        "/data/models",
        "--state-file",
        "/srv/md/current.json",
        "--flux-unit",
        "flux.service",
        "--inference-unit",
        "llm.service",
        "--timeout",
        "10",
    ]


def test_the_probe_script_is_the_packaged_file() -> None:
    assert probe_script() == PROBE_SCRIPT.read_text()
    assert PROBE_SCRIPT.parent.name == "remote"


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (CommandResult("x", 127, "", "python3: command not found"), "python3 not found"),
        (CommandResult("x", 124, "", "timed out after 30s"), "timed out"),
        (CommandResult("x", 1, "", "Traceback ...\nSyntaxError: bad"), "printed nothing"),
        (CommandResult("x", 0, "hello\n", ""), "not JSON"),
        (CommandResult("x", 0, "[1, 2]\n", ""), "not an object"),
        (CommandResult("x", 1, '{"fatal": "OSError: boom"}\n', ""), "failed on the host: OSError"),
        (CommandResult("x", 0, '{"probe_version": 1}\n', ""), "unexpected data"),
    ],
)
def test_probe_failures_are_one_probe_error(result: CommandResult, message: str) -> None:
    fake = FakeExecutor().on(is_probe, result)
    with pytest.raises(ProbeError, match=message):
        inspect_host(fake, REMOTE)


def test_unknown_keys_in_probe_output_are_rejected() -> None:
    data = probe_json()
    data["surprise"] = 1
    fake = FakeExecutor().on(is_probe, probe_answer(data))
    with pytest.raises(ProbeError, match="surprise"):
        inspect_host(fake, REMOTE)


def test_connection_errors_pass_through() -> None:
    fake = FakeExecutor().on(is_probe, ConnectError("cannot reach ubuntu@h:22: refused"))
    with pytest.raises(ConnectError):
        inspect_host(fake, REMOTE)


def test_no_gpu_is_a_fact() -> None:
    fake = FakeExecutor().on(is_probe, probe_answer(probe_json(no_gpu=True)))
    facts = inspect_host(fake, REMOTE)
    assert facts.gpu.devices == [] and facts.gpu.source == "none"
    assert "nvidia-smi not found" in (facts.gpu.error or "")


def test_state_file_is_parsed_with_schema_alias() -> None:
    state = {
        "schema": 1,
        "model": "qwen3-14b",
        "weights_model": "qwen3-14b-awq",
        "port": 8000,
        "quantization": "awq",
        "service": "asoba-inference.service",
        "flux_stopped": True,
        "deployed_at": "2026-11-23T10:42:06Z",
        "plan_id": "abc",
        "future_key": 1,
    }
    fake = FakeExecutor().on(is_probe, probe_answer(probe_json(deployed=state)))
    facts = inspect_host(fake, REMOTE)
    assert facts.deployed is not None
    assert facts.deployed.model == "qwen3-14b" and facts.deployed.schema_version == 1
    assert facts.deployed.to_file()["schema"] == 1


# --------------------------------------------------------------------------- parsers


def test_parse_gpu_csv_handles_units_free_text_and_commas_in_names() -> None:
    text = GPU_CSV + "1, GPU-b, NVIDIA A100-SXM4-80GB, 81920, [N/A], 81000, 535.183.01\n"
    text += "2, GPU-c, Weird, Name, 1000, 10, [N/A], 535\n"
    gpus = probe_host.parse_gpu_csv(text)
    assert [g["index"] for g in gpus] == [0, 1, 2]
    assert gpus[0]["memory_free_mib"] == 8516 and gpus[0]["_driver"] == "535.183.01"
    assert gpus[1]["memory_used_mib"] == 0
    assert gpus[2]["name"] == "Weird, Name" and gpus[2]["memory_free_mib"] == 990


def test_parse_apps_csv_keeps_unknown_usage_as_none() -> None:
    apps = probe_host.parse_apps_csv(APPS_CSV)
    assert apps == [
        {"pid": 4242, "name": "/usr/bin/python3", "used_mib": 14000, "gpu_uuid": "GPU-a10a"},
        {"pid": 4343, "name": "python", "used_mib": None, "gpu_uuid": "GPU-a10a"},
    ]
    assert probe_host.parse_apps_csv("No running processes found\n") == []


def test_parse_systemctl_show_blocks_in_argument_order() -> None:
    text = (
        "Id=flux-api.service\nLoadState=loaded\nActiveState=active\nSubState=running\n"
        "MainPID=812\nMemoryCurrent=36507222016\nNRestarts=2\n"
        "ControlGroup=/system.slice/flux-api.service\n\n"
        "Id=asoba-inference.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n"
        "MainPID=0\nMemoryCurrent=[not set]\nNRestarts=0\nControlGroup=\n"
    )
    units = probe_host.parse_systemctl_show(text, ["flux-api.service", "asoba-inference.service"])
    flux = units["flux-api.service"]
    assert flux["active_state"] == "active" and flux["main_pid"] == 812
    assert flux["memory_current_bytes"] == 36507222016 and flux["n_restarts"] == 2
    ours = units["asoba-inference.service"]
    assert ours["load_state"] == "not-found" and ours["memory_current_bytes"] is None
    assert (
        probe_host.parse_systemctl_show("MemoryCurrent=18446744073709551615\n", ["x"])["x"][
            "memory_current_bytes"
        ]
        is None
    )


def test_parse_proc_net_tcp_ipv4_and_ipv6() -> None:
    v4 = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000\n"
        "   1: 0100007F:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000\n"
        "   2: 0200000A:0016 0100000A:C350 01 00000000:00000000 00:00000000 00000000     0\n"
    )
    assert probe_host.parse_proc_net_tcp(v4) == [
        {"address": "0.0.0.0", "port": 8000},
        {"address": "127.0.0.1", "port": 8001},
    ]
    v6 = (
        "  sl  local_address                         remote_address                        st\n"
        "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A\n"
        "   1: 00000000000000000000000001000000:1F41 00000000000000000000000000000000:0000 0A\n"
    )
    assert probe_host.parse_proc_net_tcp(v6) == [
        {"address": "::", "port": 22},
        {"address": "::1", "port": 8001},
    ]


def test_parse_ss() -> None:
    text = (
        "LISTEN 0 4096 0.0.0.0:8000 0.0.0.0:*\n"
        "LISTEN 0 128 [::]:22 [::]:*\n"
        "LISTEN 0 128 127.0.0.53%lo:53 0.0.0.0:*\n"
        "LISTEN 0 128 *:9090 *:*\n"
    )
    assert probe_host.parse_ss(text) == [
        {"address": "0.0.0.0", "port": 8000},
        {"address": "::", "port": 22},
        {"address": "127.0.0.53", "port": 53},
        {"address": "*", "port": 9090},
    ]


def test_parse_cuda_version() -> None:
    assert probe_host.parse_cuda_version("CUDA Version        : 12.2\n") == "12.2"
    assert (
        probe_host.parse_cuda_version("| NVIDIA-SMI 550 Driver Version: 550  CUDA Version: 12.4 |")
        == "12.4"
    )
    assert probe_host.parse_cuda_version("nothing") is None


# --------------------------------------------------------------------------- the script, run


def _run_probe(
    tmp_path: Path, env: dict[str, str], state_dir: Path | None = None, timeout: float = 10.0
) -> HostFacts:
    """The real script through the executor interface, run on this machine with ``env``."""
    remote = RemoteConfig(
        models_dir=str(tmp_path / "models"), state_dir=str(state_dir or tmp_path / "state")
    )
    fake = FakeExecutor().on(is_probe, run_locally(env, python=PYTHON))
    return inspect_host(fake, remote, command_timeout=timeout)


def test_script_with_fake_nvidia_smi_and_no_pynvml(tmp_path: Path) -> None:
    env = install_fake_nvidia_smi(tmp_path / "bin", GPU_CSV, APPS_CSV)
    env |= block_pynvml(tmp_path / "shim")
    facts = _run_probe(tmp_path, env)
    assert facts.gpu.source == "nvidia-smi"
    assert facts.gpu.driver_version == "535.183.01" and facts.gpu.cuda_version == "12.2"
    (gpu,) = facts.gpu.devices
    assert (gpu.name, gpu.memory_total_mib, gpu.memory_free_mib) == ("NVIDIA A10G", 23028, 8516)
    assert gpu.processes is not None
    assert [(p.pid, p.used_mib) for p in gpu.processes] == [(4242, 14000), (4343, None)]
    assert gpu.used_by_pids({4242}) == 14000 * 1024 * 1024
    assert gpu.used_by_pids({4343}) is None  # the driver did not say
    assert facts.memory.total_bytes > 0 and facts.cpu_count >= 1
    assert facts.disk is not None and facts.disk.path == str(tmp_path / "models")
    assert facts.disk.measured_path == str(tmp_path)  # the models dir does not exist yet
    assert facts.software.python.count(".") == 2
    assert facts.deployed is None and facts.deployed_error is None


def test_script_without_any_gpu_tools(tmp_path: Path) -> None:
    env = block_pynvml(tmp_path / "shim")
    env["PATH"] = "/usr/bin:/bin"  # no nvidia-smi here
    facts = _run_probe(tmp_path, env)
    assert facts.gpu.source == "none" and facts.gpu.devices == []
    assert facts.gpu.error == "no NVIDIA driver tools: nvidia-smi not found"


def test_script_reports_a_failing_driver_without_crashing(tmp_path: Path) -> None:
    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    env = install_fake_nvidia_smi(tmp_path / "bin", msg, gpus_rc=9)
    env |= block_pynvml(tmp_path / "shim")
    facts = _run_probe(tmp_path, env)
    assert facts.gpu.devices == []
    assert "couldn't communicate with the NVIDIA driver" in (facts.gpu.error or "")


def test_script_uses_nvml_when_importable(tmp_path: Path) -> None:
    env = fake_pynvml(tmp_path / "shim")
    env["PATH"] = "/usr/bin:/bin"
    facts = _run_probe(tmp_path, env)
    assert facts.gpu.source == "nvml"
    assert facts.gpu.driver_version == "550.54.15" and facts.gpu.cuda_version == "12.4"
    (gpu,) = facts.gpu.devices
    assert (gpu.uuid, gpu.memory_used_mib) == ("GPU-fake-0", 14512)
    assert gpu.processes is not None and gpu.processes[0].used_mib == 14000
    assert gpu.processes[1].used_mib is None


def test_script_times_out_a_hanging_tool_and_still_answers(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hang = bin_dir / "nvidia-smi"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"} | block_pynvml(tmp_path / "shim")
    facts = _run_probe(tmp_path, env, timeout=0.5)
    assert facts.gpu.devices == []
    assert "timed out" in (facts.gpu.error or "")
    assert facts.duration_s < 5


def test_script_reads_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "current.json").write_text(
        json.dumps({"schema": 1, "model": "demo-tiny", "port": 8001, "quantization": "none"})
    )
    env = block_pynvml(tmp_path / "shim") | {"PATH": "/usr/bin:/bin"}
    facts = _run_probe(tmp_path, env, state_dir=state)
    assert facts.deployed is not None and facts.deployed.model == "demo-tiny"
    (state / "current.json").write_text("{not json")
    facts = _run_probe(tmp_path, env, state_dir=state)
    assert facts.deployed is None and "not JSON" in (facts.deployed_error or "")


def test_script_reads_listeners_from_proc(tmp_path: Path) -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        env = block_pynvml(tmp_path / "shim") | {"PATH": "/usr/bin:/bin"}
        facts = _run_probe(tmp_path, env)
    assert port in facts.listening_ports


def test_script_is_stdlib_only() -> None:
    import ast

    tree = ast.parse(PROBE_SCRIPT.read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    import sys

    assert imported - set(sys.stdlib_module_names) == {"pynvml"}  # optional, guarded


def test_ssh_feeds_string_stdin_in_large_chunks() -> None:
    """The probe goes on stdin: Invoke's default reads a StringIO one byte per 10 ms turn."""
    import io

    from deployer.ssh import STDIN_CHUNK, _ChunkedStdinRemote

    stream = io.StringIO("x" * (STDIN_CHUNK + 10))
    runner = _ChunkedStdinRemote.__new__(_ChunkedStdinRemote)
    assert len(runner.read_our_stdin(stream) or "") == STDIN_CHUNK
    assert runner.read_our_stdin(stream) == "x" * 10
    assert runner.read_our_stdin(stream) == ""  # EOF: Invoke then closes the remote stdin


def test_script_runs_on_the_system_python(tmp_path: Path) -> None:
    """Hosts run the probe with their stock python3, outside any virtualenv."""
    exe = "/usr/bin/python3"
    if not Path(exe).is_file():
        pytest.skip("no /usr/bin/python3 here")
    env = block_pynvml(tmp_path / "shim") | install_fake_nvidia_smi(tmp_path / "bin", GPU_CSV)
    remote = RemoteConfig(models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"))
    fake = FakeExecutor().on(is_probe, run_locally(env, python=exe))
    facts = inspect_host(fake, remote)
    assert facts.software.python.startswith("3.")
    assert facts.gpu.devices[0].memory_total_mib == 23028


def test_a_crashing_tool_is_reported_by_its_last_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo '  File \"x\", line 1' >&2\necho 'PermissionError: denied' >&2\nexit 1\n"
    )
    tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"} | block_pynvml(tmp_path / "shim")
    facts = _run_probe(tmp_path, env)
    assert facts.gpu.error == "nvidia-smi failed: PermissionError: denied"
