"""Configuration: defaults < file < environment < flags, unknown keys rejected with a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.config import load_settings
from deployer.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_deployment_doc() -> None:
    s = load_settings(environ={})
    assert s.remote.service_dir == "/opt/asoba-inference"
    assert s.remote.models_dir == "/opt/models"
    assert s.remote.service_name == "asoba-inference.service"
    assert s.remote.flux_service == "flux-api.service"
    assert s.remote.service_user == "asoba-inference"  # its own account, not the SSH user
    assert (s.service.memory_max, s.service.cpu_quota, s.service.restart_sec) == ("32G", "800%", 10)
    assert (s.policy.coexist_max_gb, s.policy.quantize_above_gb) == (3.0, 20.0)
    assert (s.policy.coexist_port, s.policy.replace_port) == (8001, 8000)
    with pytest.raises(ConfigError, match="no target host configured"):
        s.require_host()


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[host]\naddress = "10.0.0.5"\nport = 2200\nkey_file = "keys/id"\n'
        "[policy]\ncoexist_max_gb = 4.5\n",
    )
    s = load_settings(path, environ={"MODEL_DEPLOYER_HOST__PORT": "2222"})
    assert s.host.address == "10.0.0.5"
    assert s.host.port == 2222
    assert s.host.key_file == (tmp_path / "keys/id").resolve()
    assert s.policy.coexist_max_gb == 4.5
    s = load_settings(
        path,
        environ={"MODEL_DEPLOYER_HOST__PORT": "2222"},
        overrides={"host": {"port": 2300}},
    )
    assert s.host.port == 2300


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[s3]\nbucket = "other-bucket"\n')
    s = load_settings(environ={"MODEL_DEPLOYER_CONFIG": str(path)})
    assert s.s3.bucket == "other-bucket"
    assert s.source == str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[host]\nadress = "x"\n', r"host\.adress: unknown key"),
        ('[hots]\naddress = "x"\n', r"hots: unknown key"),
        ("[host]\nport = 70000\n", r"host\.port"),
        ('[remote]\nmodels_dir = "relative/dir"\n', r"remote\.models_dir: must be an absolute"),
        ('[remote]\nmodels_dir = "/opt/$(id)"\n', r"remote\.models_dir"),
        ('[remote]\nservice_user = "root"\n', r"remote\.service_user: must be a non-root"),
        ('[remote]\nservice_name = "x; reboot"\n', r"remote\.service_name"),
        ('[service]\nmemory_max = "lots"\n', r"service\.memory_max"),
        ('[service]\ncpu_quota = "8"\n', r"service\.cpu_quota"),
        ('[s3]\nendpoint_url = "ftp://x"\n', r"s3\.endpoint_url"),
        ("[host\n", r"not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings(write(tmp_path, text), environ={})
    assert "\n" not in str(info.value)


def test_unknown_env_section_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section 'hots' \(did you mean 'host'"):
        load_settings(environ={"MODEL_DEPLOYER_HOTS__ADDRESS": "x"})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "missing.toml", environ={})


@pytest.mark.parametrize(
    "url",
    ["https://user:pw@pypi.example/simple", "https://token@pypi.example/simple"],
)
def test_index_url_with_credentials_is_refused(tmp_path: Path, url: str) -> None:
    """They would reach pip's argv under sudo (auth.log, ps) on the host."""
    path = write(tmp_path, f'[install]\nindex_url = "{url}"\n')
    with pytest.raises(ConfigError, match="must not carry credentials") as info:
        load_settings(path, environ={})
    assert "pw" not in str(info.value) and "token" not in str(info.value)


def test_index_url_must_be_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http"):
        load_settings(write(tmp_path, '[install]\nindex_url = "ftp://x/simple"\n'), environ={})
    ok = load_settings(write(tmp_path, '[install]\nindex_url = "https://pypi.example/simple"\n'))
    assert ok.install.index_url == "https://pypi.example/simple"


# ------------------------------------------------------------------- discovery in the cwd

BROKEN_TOML = "[host\naddress = \n"


def test_a_config_file_in_the_working_directory_does_not_reach_the_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken ./model-deployer.toml where the tests run (the repository root, where the
    README puts the operator's) changes nothing: every load sees only what the test gives."""
    (tmp_path / "model-deployer.toml").write_text(BROKEN_TOML)
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.source == "defaults" and s.host.address is None
    s = load_settings(environ={"MODEL_DEPLOYER_HOST__PORT": "2222"})
    assert s.source == "defaults" and s.host.port == 2222
    given = write(tmp_path, '[host]\naddress = "10.0.0.5"\n')
    assert load_settings(environ={"MODEL_DEPLOYER_CONFIG": str(given)}).host.address == "10.0.0.5"


def test_operators_config_in_the_working_directory_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_config_discovery: Path
) -> None:
    """What operators get: ./model-deployer.toml when no path and no MODEL_DEPLOYER_CONFIG
    name another, a broken one reported as such, and none at all meaning the defaults."""
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).source == "defaults"
    (tmp_path / user_config_discovery).write_text('[host]\naddress = "10.0.0.7"\n')
    s = load_settings(environ={})
    assert s.host.address == "10.0.0.7" and s.source == str(user_config_discovery)
    other = write(tmp_path, '[host]\naddress = "10.0.0.8"\n')
    assert load_settings(environ={"MODEL_DEPLOYER_CONFIG": str(other)}).host.address == "10.0.0.8"
    (tmp_path / user_config_discovery).write_text(BROKEN_TOML)
    with pytest.raises(ConfigError, match=r"model-deployer\.toml: not valid TOML"):
        load_settings(environ={})


def test_an_overrides_error_names_its_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "md.toml"
    config.write_text("[host]\nport = 22\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={"MODEL_DEPLOYER_HOST__PORT": "abc"})
    assert str(caught.value).startswith("MODEL_DEPLOYER_HOST__PORT: host.port: ")
    config.write_text('[host]\nport = "abc"\n')  # the same mistake in the file names the file
    with pytest.raises(ConfigError, match=r"^md\.toml: host\.port: "):
        load_settings(config, environ={})


def test_unknown_keys_suggest_the_nearest_one(tmp_path: Path) -> None:
    config = tmp_path / "md.toml"
    config.write_text('[host]\nadress = "x"\n')
    with pytest.raises(
        ConfigError, match=r"host\.adress: unknown key \(did you mean 'address'\?\)"
    ):
        load_settings(config, environ={})
    config.write_text('[hots]\naddress = "x"\n')
    with pytest.raises(ConfigError, match=r"hots: unknown key \(did you mean 'host'\?\)"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match=r"^MODEL_DEPLOYER_REMOTE__PYTON: .*'python'"):
        load_settings(None, environ={"MODEL_DEPLOYER_REMOTE__PYTON": "python3"})
