"""Settings from the environment (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote_service.settings import Settings, SettingsError, unknown_env_vars


def test_defaults_for_mock_need_no_model_dir() -> None:
    s = Settings.from_env({"ASOBA_BACKEND": "mock"})
    assert s.backend == "mock"
    assert s.served_model_name == "mock"
    assert (s.host, s.port, s.device, s.dtype, s.quantization) == (
        "0.0.0.0",
        8000,
        "auto",
        "auto",
        "none",
    )
    assert s.api_key is None


def test_every_field_is_read_from_its_variable(tmp_path: Path) -> None:
    env = {
        "ASOBA_MODEL_DIR": str(tmp_path / "qwen3-14b"),
        "ASOBA_MODEL_NAME": "qwen3-14b",
        "ASOBA_BACKEND": "transformers",
        "ASOBA_DEVICE": "cuda:0",
        "ASOBA_DTYPE": "bf16",
        "ASOBA_QUANTIZATION": "BNB-4bit",
        "ASOBA_HOST": "127.0.0.1",
        "ASOBA_PORT": "8001",
        "ASOBA_MAX_NUM_SEQS": "8",
        "ASOBA_MAX_QUEUE": "32",
        "ASOBA_MAX_NEW_TOKENS": "1024",
        "ASOBA_DEFAULT_MAX_TOKENS": "256",
        "ASOBA_MAX_MODEL_LEN": "8192",
        "ASOBA_PREFILL_CHUNK": "256",
        "ASOBA_MAX_PROMPT_CHARS": "100000",
        "ASOBA_API_KEY": "sekret",
        "ASOBA_REASONING": "split",
        "ASOBA_SHUTDOWN_TIMEOUT": "15",
        "ASOBA_WARMUP": "false",
        "ASOBA_LOG_LEVEL": "debug",
        "ASOBA_MOCK_TOKEN_DELAY": "0.1",
        "ASOBA_MAX_REQUEST_BYTES": "2097152",
        "ASOBA_REQUEST_TIMEOUT": "12.5",
        "ASOBA_MAX_CONNECTIONS": "256",
        "ASOBA_CORS_ORIGINS": "https://a.example, https://b.example",
        "ASOBA_API_DOCS": "true",
        "ASOBA_VLLM_PYTHON": "/opt/vllm/bin/python",
        "ASOBA_GPU_MEMORY_UTILIZATION": "0.85",
        "ASOBA_TENSOR_PARALLEL_SIZE": "2",
        "ASOBA_KV_CACHE_BYTES": "4294967296",
        "ASOBA_VLLM_ENFORCE_EAGER": "ON",
        "ASOBA_VLLM_SOCKET": "/run/asoba/vllm.sock",
        "ASOBA_VLLM_START_TIMEOUT": "600",
        "ASOBA_VLLM_TOOL_CALL_PARSER": "hermes",
    }
    assert sorted(env) == sorted(Settings.env_names())
    s = Settings.from_env(env)
    assert (s.vllm_python, s.gpu_memory_utilization, s.tensor_parallel_size) == (
        Path("/opt/vllm/bin/python"),
        0.85,
        2,
    )
    assert (s.kv_cache_bytes, s.vllm_enforce_eager, s.vllm_start_timeout) == (
        4 * 1024**3,
        "on",
        600,
    )
    assert s.vllm_socket == Path("/run/asoba/vllm.sock")
    assert s.vllm_tool_call_parser == "hermes"
    assert s.model_dir == tmp_path / "qwen3-14b"
    assert s.dtype == "bfloat16"
    assert s.quantization == "bnb-4bit"
    assert s.port == 8001
    assert s.max_model_len == 8192
    assert s.prefill_chunk == 256
    assert s.api_key is not None and s.api_key.get_secret_value() == "sekret"
    assert s.warmup is False
    assert (s.max_request_bytes, s.request_timeout, s.max_connections) == (2097152, 12.5, 256)
    assert s.cors_origin_list == ["https://a.example", "https://b.example"]
    assert "sekret" not in repr(s)
    assert s.public_dict()["api_key_set"] is True
    assert "api_key" not in s.public_dict()


def test_empty_values_count_as_unset() -> None:
    s = Settings.from_env({"ASOBA_BACKEND": "mock", "ASOBA_API_KEY": "", "ASOBA_PORT": " "})
    assert s.api_key is None
    assert s.port == 8000


def test_model_name_defaults_to_the_directory_name(tmp_path: Path) -> None:
    s = Settings.from_env({"ASOBA_MODEL_DIR": str(tmp_path / "demo-tiny")})
    assert s.served_model_name == "demo-tiny"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "ASOBA_MODEL_DIR is required unless ASOBA_BACKEND=mock"),
        ({"ASOBA_BACKEND": "mock", "ASOBA_PORT": "http"}, "ASOBA_PORT: Input should be a valid"),
        ({"ASOBA_BACKEND": "mock", "ASOBA_PORT": "70000"}, "ASOBA_PORT: Input should be less"),
        ({"ASOBA_BACKEND": "mock", "ASOBA_QUANTIZATION": "gptq"}, "ASOBA_QUANTIZATION: Input"),
        ({"ASOBA_BACKEND": "mock", "ASOBA_DEVICE": "tpu"}, "ASOBA_DEVICE: must be auto, cpu"),
        ({"ASOBA_BACKEND": "mock", "ASOBA_DTYPE": "int3"}, "ASOBA_DTYPE: Input should be"),
        ({"ASOBA_BACKEND": "tgi"}, "ASOBA_BACKEND: Input should be"),
        (
            {"ASOBA_BACKEND": "mock", "ASOBA_DEVICE": "cpu", "ASOBA_QUANTIZATION": "bnb-4bit"},
            "ASOBA_QUANTIZATION=bnb-4bit needs a CUDA GPU",
        ),
        (
            {"ASOBA_BACKEND": "mock", "ASOBA_MAX_NEW_TOKENS": "10"},
            "ASOBA_DEFAULT_MAX_TOKENS must not exceed ASOBA_MAX_NEW_TOKENS",
        ),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_unknown_variables_get_a_suggestion() -> None:
    env = {"ASOBA_MAX_NUM_SEQ": "4", "ASOBA_INFERENCE_PORT": "8001", "PATH": "/bin"}
    found = unknown_env_vars(env)
    assert "ASOBA_MAX_NUM_SEQ (did you mean ASOBA_MAX_NUM_SEQS?)" in found
    assert any(f.startswith("ASOBA_INFERENCE_PORT") for f in found)
    assert not any(f.startswith("PATH") for f in found)


def test_vllm_settings_are_checked() -> None:
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({"ASOBA_BACKEND": "vllm", "ASOBA_MODEL_DIR": "/m"})
    assert exc.value.problems == [
        "ASOBA_VLLM_PYTHON is required with ASOBA_BACKEND=vllm: the python of the venv vLLM "
        "is installed in (e.g. /opt/vllm/bin/python)"
    ]
    base = {"ASOBA_BACKEND": "vllm", "ASOBA_MODEL_DIR": "/m", "ASOBA_VLLM_PYTHON": "/p"}
    for name, value in (
        ("ASOBA_GPU_MEMORY_UTILIZATION", "0"),
        ("ASOBA_GPU_MEMORY_UTILIZATION", "1.5"),
        ("ASOBA_TENSOR_PARALLEL_SIZE", "17"),
        ("ASOBA_VLLM_ENFORCE_EAGER", "sometimes"),
    ):
        with pytest.raises(SettingsError) as exc:
            Settings.from_env({**base, name: value})
        assert exc.value.problems[0].startswith(name + ":")
    with pytest.raises(SettingsError, match="ASOBA_MODEL_DIR is required"):
        Settings.from_env({"ASOBA_BACKEND": "vllm", "ASOBA_VLLM_PYTHON": "/p"})
