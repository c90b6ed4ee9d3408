"""Bad input to the catalog and the config: whatever the operator's files and environment hold,
loading either succeeds or fails with the project's own one-line error (exit 2 at the CLI).

Generated documents (hypothesis) cover nested mappings and lists where scalars belong, wrong
types, huge and non-finite numbers, unicode, NULs, control characters, duplicate keys, YAML
tags and aliases, and raw bytes that are not UTF-8. Whatever does load must be safe to use:
names and paths in the shell-safe character sets, numbers the planner can turn into bytes.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deployer import cli
from deployer.catalog import MODEL_NAME_RE, S3_PREFIX_RE, SCRIPT_RE, Catalog, load_catalog
from deployer.config import SECTIONS, Settings, load_settings
from deployer.errors import CatalogError, ConfigError
from deployer.make_plan import estimates_for
from deployer.planner import PlanFlags, plan_deployment
from deployer.pull import pull_request
from tests import model_shapes as ms
from tests.fakes import GB, g5_facts
from tests.model_metadata import meta_from_tensors

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DEPLOY_MODEL = Path(sys.executable).parent / "deploy-model"
SAFE_WORD = re.compile(r"^[A-Za-z0-9._/@%:-]+$")  # what loaded names and paths may contain

# ------------------------------------------------------------------------------ helpers


def assert_one_line(message: str) -> None:
    """A clean operator message: non-empty, one line, nothing that drives the terminal."""
    assert message.strip(), "empty error message"
    assert message.splitlines() == [message], f"not one line: {message!r}"
    assert message.isprintable(), f"control characters in: {message!r}"


def load_catalog_text(directory: Path, data: str | bytes) -> Catalog | CatalogError:
    path = directory / "catalog.yaml"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    try:
        catalog = load_catalog(path)
    except CatalogError as exc:  # anything else escapes and fails the test
        assert_one_line(exc.message)
        assert exc.exit_code == 2
        return exc
    assert_catalog_is_safe(catalog)
    return catalog


def load_config_text(
    directory: Path, data: str | bytes, environ: dict[str, str] | None = None
) -> Settings | ConfigError:
    path = directory / "model-deployer.toml"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return load_config(path, environ or {})


def load_config(path: Path | None, environ: dict[str, str]) -> Settings | ConfigError:
    try:
        loaded = load_settings(path, environ=environ)
    except ConfigError as exc:
        assert_one_line(exc.message)
        assert exc.exit_code == 2
        return exc
    assert_settings_are_safe(loaded)
    return loaded


def assert_catalog_is_safe(catalog: Catalog) -> None:
    """What loads can go into paths and argv: the validators held."""
    assert SAFE_WORD.fullmatch(catalog.bucket)
    for name, spec in catalog.models.items():
        assert MODEL_NAME_RE.fullmatch(name) and ".." not in name and spec.name == name
        assert S3_PREFIX_RE.fullmatch(spec.s3_prefix) and ".." not in spec.s3_prefix
        assert spec.revision is None or MODEL_NAME_RE.fullmatch(spec.revision)
        if spec.bootstrap is not None:
            assert SCRIPT_RE.fullmatch(spec.bootstrap.script)
            assert ".." not in Path(spec.bootstrap.script).parts
        for number in (spec.parameters_b, spec.size_gb):
            assert math.isfinite(number) and number > 0


def assert_settings_are_safe(loaded: Settings) -> None:
    remote = loaded.remote
    for word in (
        remote.service_dir,
        remote.models_dir,
        remote.state_dir,
        remote.service_name,
        remote.flux_service,
        remote.service_user,
        remote.python,
        loaded.host.user,
    ):
        assert SAFE_WORD.fullmatch(word), word
    assert loaded.host.address is None or SAFE_WORD.fullmatch(loaded.host.address)
    for section in (loaded.host, loaded.s3, loaded.service, loaded.policy):
        for value in section.model_dump().values():
            if isinstance(value, float):
                assert math.isfinite(value), section


# ------------------------------------------------------------------------------ strategies

PAYLOADS = [
    "a;reboot",
    "$(reboot)",
    "`reboot`",
    "two words",
    "../../etc/passwd",
    "a\nreboot",
    "a|reboot",
    "a&reboot",
    "'\"",
    "-rf",
    "\x00",
    "\x1b[2J",
    "\u2028",
    "é中\U0001f600",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**63, 2**64 + 1, 10**400, -(10**400)]),
    st.floats(),  # nan, inf, -0.0, subnormals, 1e308
    st.text(max_size=12),  # unicode, NUL and control characters included
    st.sampled_from(PAYLOADS),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ENTRY_KEYS = [
    "name",
    "description",
    "tier",
    "s3_prefix",
    "format",
    "precision",
    "parameters_b",
    "size_gb",
    "context_length",
    "awq_variant",
    "bootstrap",
    "revision",
]


def base_catalog() -> dict[str, Any]:
    return {
        "bucket": "asoba-llm-cache",
        "models": {
            "m": {
                "description": "a model",
                "tier": "raw",
                "s3_prefix": "models/m/",
                "parameters_b": 1.5,
                "size_gb": 3.0,
                "context_length": 8192,
                "revision": "r1",
                "bootstrap": {"script": "boot.sh", "step": "before-start"},
            },
            "m-awq": {
                "tier": "raw",
                "s3_prefix": "models/m-awq/",
                "format": "awq",
                "precision": "int4",
                "parameters_b": 1.5,
                "size_gb": 1.0,
            },
        },
    }


def _dig(data: Any, *keys: str) -> dict[str, Any] | None:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


@st.composite
def mutated_catalogs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid catalog with one to three fields replaced, added or removed."""
    data = base_catalog()
    for _ in range(draw(st.integers(1, 3))):
        entry = draw(st.sampled_from(["m", "m-awq"]))
        target, keys = draw(
            st.sampled_from(
                [
                    ((), ["bucket", "models", "extra"]),
                    (("models",), ["m", "m-awq", *PAYLOADS]),
                    (("models", entry), ENTRY_KEYS),
                    (("models", entry), ENTRY_KEYS),
                    (("models", "m", "bootstrap"), ["script", "step"]),
                ]
            )
        )
        table = _dig(data, *target)
        if table is None:
            continue
        key = draw(st.sampled_from(keys) | st.text(max_size=6))
        if key in table and draw(st.booleans()):
            del table[key]
        else:
            table[key] = draw(VALUES | st.sampled_from(PAYLOADS))
    return data


YAML_FRAGMENTS = [
    "bucket: asoba-llm-cache\n",
    "bucket: other\n",
    "models:\n",
    "  m:\n",
    "  m:\n",  # a duplicate key
    "    tier: raw\n",
    "    s3_prefix: models/m/\n",
    "    parameters_b: 1\n",
    "    size_gb: ",
    "2001-13-45",
    "2001-12-14 21:59:43.10 -5",
    "!!int abc",
    "!!float abc",
    "!!binary '@@@'",
    "!!timestamp x",
    "!!bool x",
    "!!int",
    "!!float\n",
    "!!python/object/apply:os.system ['id']",
    "!!set {a, b}",
    "&a [1, 2]",
    "*a",
    "*nope",
    "<<: *a\n",
    "? [a, b]\n",
    "9" * 4400,
    "1.0e+999",
    "-.inf",
    ".nan",
    "0x_",
    "0o9",
    "~",
    "%YAML 1.1\n---\n",
    "---\n",
    "...\n",
    "{",
    "}",
    "[",
    "]",
    "'",
    '"',
    '"\\x00\\u2028"',
    "\t",
    "\x00",
    "\ufeff",
    "\x85",
    "- ",
    ": ",
    "\n",
    "    ",
]
YAML_TEXT = st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=4), max_size=25).map(
    "".join
)


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if value is None:
        return '""'  # TOML has no null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(data: dict[str, Any]) -> str:
    plain = [
        f"{toml_string(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)
    ]
    tables = [
        f"[{toml_string(k)}]\n"
        + "".join(f"{toml_string(f)} = {toml_value(v)}\n" for f, v in t.items())
        for k, t in data.items()
        if isinstance(t, dict)
    ]
    return "".join(line + "\n" for line in plain) + "\n".join(tables)


FIELDS = {name: list(Settings.model_fields[name].annotation.model_fields) for name in SECTIONS}


def base_config() -> dict[str, Any]:
    return {
        "host": {"address": "10.0.0.5", "port": 22, "user": "ubuntu", "connect_timeout": 5.0},
        "s3": {"region": "us-west-2", "pull_concurrency": 8, "pull_max_rate_mbps": 0.0},
        "remote": {"models_dir": "/opt/models", "service_name": "asoba-inference.service"},
        "service": {"memory_max": "32G", "cpu_quota": "800%"},
        "policy": {"coexist_max_gb": 3.0, "gpu_margin_gb": 1.0, "context_tokens": 4096},
        "install": {"wheelhouse": "/opt/wheels"},
    }


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    data = base_config()
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([*SECTIONS, "catalog", "hots"]) | st.text(max_size=5))
        table = data.setdefault(section, {}) if section in FIELDS else None
        if isinstance(table, dict) and draw(st.integers(0, 4)):
            key = draw(st.sampled_from(FIELDS[section]) | st.text(max_size=6))
            table[key] = draw(VALUES | st.sampled_from(PAYLOADS))
        else:
            data[section] = draw(VALUES)
    return data


TOML_FRAGMENTS = [
    "[host]\n",
    "[host]\n",  # a table defined twice
    "[remote]\n",
    "[policy]\n",
    "[[host]]\n",
    "address = ",
    "port = ",
    "port = 1\n",
    "port = 2\n",  # a duplicate key
    'models_dir = "/opt/$(reboot)"\n',
    "coexist_max_gb = ",
    "inf",
    "nan",
    "-0.0",
    "1e309",
    "9" * 4400,
    "0x7fffffffffffffffffff",
    "1979-13-45",
    "1979-05-27T07:32:00Z",
    '"\\u0000"',
    '"\\ud800"',
    "'''",
    '"""',
    "[",
    "]",
    "{",
    "}",
    "=",
    ".",
    "\x00",
    "\x7f",
    "\r",
    "\n",
]
TOML_TEXT = st.lists(st.sampled_from(TOML_FRAGMENTS) | st.text(max_size=4), max_size=25).map(
    "".join
)
ENV_VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(PAYLOADS),
    st.sampled_from(["inf", "-inf", "nan", "1e309", "-0", "9" * 5000, "0x10", "", " 22 ", "~x/k"]),
    st.integers().map(str),
    st.floats().map(repr),
)


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(SECTIONS) | st.text(max_size=5))
        fields = FIELDS.get(section, [])
        key = draw(st.sampled_from(fields) if fields else st.text(max_size=6))
        name = f"MODEL_DEPLOYER_{section.upper()}__{key.upper()}"
        env[name] = draw(ENV_VALUES)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every generated file (hypothesis reuses it across examples)."""
    path = tmp_path_factory.mktemp("bad-input")
    (path / "boot.sh").write_text("#!/bin/sh\ntrue\n")
    return path


# ------------------------------------------------------------------------------ catalog fuzzing


@FUZZ
@given(data=mutated_catalogs())
def test_mutated_catalogs_load_or_fail_cleanly(workdir: Path, data: dict[str, Any]) -> None:
    load_catalog_text(workdir, yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


@FUZZ
@given(data=VALUES)
def test_any_yaml_value_as_catalog_fails_cleanly(workdir: Path, data: Any) -> None:
    result = load_catalog_text(workdir, yaml.safe_dump(data, allow_unicode=True))
    assert isinstance(result, CatalogError)  # never a catalog: no 'models' of valid entries


@FUZZ
@given(text=YAML_TEXT)
@example(text="bucket: asoba-llm-cache\nmodels:\n  m:\n    size_gb: 2001-13-45\n")
@example(text="models: {m: {size_gb: !!int abc}}\n")
@example(text="bucket: !!timestamp x\n")
@example(text="bucket: !!bool x\n")
@example(text="bucket: !!int\n")
@example(text="models: {m: {size_gb: " + "9" * 4400 + "}}\n")
@example(text="[" * 5000)
@example(text='models:\n  "a\\nb": 3\n')
@example(text='bucket: x\nmodels: {m: {"\\e[2J": 1}}\n')
def test_raw_yaml_text_loads_or_fails_cleanly(workdir: Path, text: str) -> None:
    load_catalog_text(workdir, text)


@FUZZ
@given(raw=st.binary(max_size=64))
@example(raw=b"\xff\xfebucket: x\n")
@example(raw=b"bucket: \xc3\x28\n")
def test_catalog_bytes_that_are_not_utf8_fail_cleanly(workdir: Path, raw: bytes) -> None:
    load_catalog_text(workdir, raw)


def test_duplicate_keys_in_the_catalog_keep_the_last(workdir: Path) -> None:
    text = (
        "bucket: nope nope\nbucket: asoba-llm-cache\nmodels:\n"
        "  m: {tier: raw, s3_prefix: 'x;y/', parameters_b: 1, size_gb: 1}\n"
        "  m: {tier: raw, s3_prefix: models/m/, parameters_b: 1, size_gb: 1}\n"
    )
    catalog = load_catalog_text(workdir, text)
    assert isinstance(catalog, Catalog)
    assert catalog.bucket == "asoba-llm-cache" and catalog.models["m"].s3_prefix == "models/m/"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: {m: {size_gb: 2001-13-45}}\n", r"not valid YAML: .*month must be in 1\.\.12"),
        ("bucket: !!timestamp x\n", "not valid YAML: a value cannot be read"),
        ("bucket: !!bool x\n", "not valid YAML: a value cannot be read"),
        ("models: {m: {size_gb: !!float abc}}\n", "not valid YAML"),
        ("x: " + "9" * 4400 + "\n", "not valid YAML"),
        ("[" * 5000, "not valid YAML"),
        ('bucket: asoba-llm-cache\nmodels:\n  "a\\nb": 3\n', r"models\.a\\nb: expected a mapping"),
        (
            'bucket: asoba-llm-cache\n"\\e[2J": 1\n'
            "models: {m: {tier: raw, s3_prefix: models/m/, parameters_b: 1, size_gb: 1}}\n",
            r"catalog\.yaml: \\x1b\[2J: unknown key",
        ),
    ],
)
def test_catalog_errors_found_by_fuzzing(workdir: Path, text: str, expected: str) -> None:
    result = load_catalog_text(workdir, text)
    assert isinstance(result, CatalogError)
    assert re.search(expected, result.message), result.message


def test_catalog_path_that_is_unusable_fails_cleanly(workdir: Path) -> None:
    for path in (workdir, workdir / "a\x00b.yaml", workdir / ("x" * 300), workdir / "nope\n.yaml"):
        with pytest.raises(CatalogError) as info:
            load_catalog(path)
        assert_one_line(info.value.message)
    (workdir / "long.yaml").write_text(
        yaml.safe_dump(
            {
                **base_catalog(),
                "models": {
                    "m": {**base_catalog()["models"]["m"], "bootstrap": {"script": "a" * 250}}
                },
            }
        )
    )
    with pytest.raises(CatalogError, match=r"bootstrap\.script: no file"):
        load_catalog(workdir / "long.yaml")


# ------------------------------------------------------------------------------ config fuzzing


@FUZZ
@given(data=mutated_configs())
def test_mutated_configs_load_or_fail_cleanly(workdir: Path, data: dict[str, Any]) -> None:
    load_config_text(workdir, toml_document(data))


@FUZZ
@given(text=TOML_TEXT)
@example(text="a = " + "[" * 3000)
@example(text="[host]\nport = " + "9" * 4400 + "\n")
@example(text='[host]\n"a\\nb" = 1\n')
@example(text='[host]\nkey_file = "a\\u0000b"\n')
@example(text='[host]\nknown_hosts = "~no-such-user-here/known_hosts"\n')
@example(text="[policy]\ngpu_margin_gb = inf\n")
@example(text="[policy]\ndisk_margin_gb = 1e300\n")
def test_raw_toml_text_loads_or_fails_cleanly(workdir: Path, text: str) -> None:
    load_config_text(workdir, text)


@FUZZ
@given(raw=st.binary(max_size=64))
@example(raw=b"\xff\xfe[host]\n")
def test_config_bytes_that_are_not_utf8_fail_cleanly(workdir: Path, raw: bytes) -> None:
    load_config_text(workdir, raw)


@FUZZ
@given(environ=environments())
@example(environ={"MODEL_DEPLOYER_HO\nST__PORT": "1"})
@example(environ={"MODEL_DEPLOYER_HOST__KEY_FILE": "a\x00b"})
@example(environ={"MODEL_DEPLOYER_CATALOG": "a\x00b"})
@example(environ={"MODEL_DEPLOYER_HOST__CONNECT_TIMEOUT": "1e309"})
@example(environ={"MODEL_DEPLOYER_S3__PULL_MAX_RATE_MBPS": "inf"})
def test_environment_overrides_load_or_fail_cleanly(environ: dict[str, str]) -> None:
    load_config(None, environ)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MODEL_DEPLOYER_HO\nST__PORT": "1"}, r"MODEL_DEPLOYER_HO\\nST__PORT: unknown section"),
        ({"MODEL_DEPLOYER_HOST__KEY_FILE": "a\x00b"}, r"host\.key_file: not a usable path"),
        ({"MODEL_DEPLOYER_CATALOG": "a\x00b"}, r"catalog: not a usable path"),
        ({"MODEL_DEPLOYER_HOST__KNOWN_HOSTS": "~no-such-user-here/k"}, r"host\.known_hosts: "),
        ({"MODEL_DEPLOYER_POLICY__GPU_MARGIN_GB": "inf"}, r"gpu_margin_gb: .*finite"),
        ({"MODEL_DEPLOYER_POLICY__COEXIST_MAX_GB": "nan"}, r"coexist_max_gb: .*finite"),
        ({"MODEL_DEPLOYER_POLICY__DISK_MARGIN_GB": "1e300"}, r"disk_margin_gb: .*less than"),
        ({"MODEL_DEPLOYER_S3__PULL_MAX_RATE_MBPS": "1e400"}, r"pull_max_rate_mbps: "),
    ],
)
def test_config_errors_found_by_fuzzing(environ: dict[str, str], expected: str) -> None:
    result = load_config(None, environ)
    assert isinstance(result, ConfigError)
    assert re.search(expected, result.message), result.message


def test_config_file_errors_found_by_fuzzing(workdir: Path) -> None:
    for text, expected in [
        ("[host]\nport = " + "9" * 4400 + "\n", "not valid TOML: a number is too long"),
        ("a = " + "[" * 3000, "not valid TOML: nested too deeply"),
        ('[remote]\n"x\\u001b[2J" = 1\n', r"remote\.x\\x1b\[2J: unknown key"),
    ]:
        result = load_config_text(workdir, text)
        assert isinstance(result, ConfigError)
        assert re.search(expected, result.message), result.message
    result = load_config_text(workdir, b"\xff[host]\n")
    assert isinstance(result, ConfigError) and "not UTF-8" in result.message


NUMBER_FIELDS = [
    ("POLICY", "COEXIST_MAX_GB"),
    ("POLICY", "QUANTIZE_ABOVE_GB"),
    ("POLICY", "GPU_MARGIN_GB"),
    ("POLICY", "RAM_MARGIN_GB"),
    ("POLICY", "DISK_MARGIN_GB"),
    ("POLICY", "CONTEXT_TOKENS"),
    ("POLICY", "CONCURRENT_SEQS"),
    ("S3", "PULL_MAX_RATE_MBPS"),
    ("S3", "PULL_PART_MB"),
]
NUMBER_TEXT = st.one_of(
    st.floats().map(repr),
    st.integers().map(str),
    st.sampled_from(["inf", "nan", "1e300", "1e308", "1e15", "0", "-0.0", "9" * 40]),
)
CATALOG = load_catalog()


@FUZZ
@given(values=st.dictionaries(st.sampled_from(NUMBER_FIELDS), NUMBER_TEXT, min_size=1, max_size=4))
@example(values={("POLICY", "GPU_MARGIN_GB"): "1e300"})
@example(values={("S3", "PULL_MAX_RATE_MBPS"): "inf"})
@example(values={("POLICY", "GPU_MARGIN_GB"): "1e6", ("S3", "PULL_MAX_RATE_MBPS"): "1e6"})
@example(values={("POLICY", "QUANTIZE_ABOVE_GB"): "1e6", ("POLICY", "COEXIST_MAX_GB"): "1e6"})
def test_any_number_that_loads_can_be_planned_and_pulled(
    values: dict[tuple[str, str], str],
) -> None:
    """Huge or non-finite policy numbers are refused at load, or the planner and the pull
    request (which turn GB into bytes with int()) work with them."""
    environ = {f"MODEL_DEPLOYER_{section}__{key}": text for (section, key), text in values.items()}
    loaded = load_config(None, environ)
    if isinstance(loaded, ConfigError):
        return
    spec = CATALOG.models["mistral_policy_analysis"]
    meta = meta_from_tensors(spec, ms.config(spec.name), ms.model_shards(spec.name))
    estimates = estimates_for({spec.name: meta}, CATALOG, loaded)
    plan_deployment(spec, CATALOG, estimates, g5_facts(), loaded, PlanFlags())
    request = pull_request(loaded, spec, bucket=CATALOG.bucket)
    assert 0 <= request.disk_margin_bytes <= 10**6 * GB
    # deployer/apply.py hands the host the rate cap as whole bytes per second:
    assert int(loaded.s3.pull_max_rate_mbps * 1e6 / 8) >= 0


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ./model-deployer.toml of the repository's working directory leaks in."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_clean_failure(stderr: str, code: int, *, expected_code: int = 2) -> str:
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


BROKEN_CATALOGS = {
    "invalid-yaml": "models: [unclosed\n",
    "impossible-date": "bucket: asoba-llm-cache\nmodels: {m: {size_gb: 2001-13-45}}\n",
    "huge-int": "bucket: " + "9" * 4400 + "\n",
    "deep": "[" * 5000,
    "newline-key": 'bucket: asoba-llm-cache\nmodels:\n  "m\\nreboot": 1\n',
    "payload-prefix": "bucket: asoba-llm-cache\nmodels:\n"
    "  m: {tier: raw, s3_prefix: 'models/$(reboot)/', parameters_b: 1, size_gb: 1}\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN_CATALOGS))
def test_cli_broken_catalog_from_environment_is_exit_2_one_line(in_tmp: Path, name: str) -> None:
    path = in_tmp / "catalog.yaml"
    path.write_text(BROKEN_CATALOGS[name], encoding="utf-8")
    env = {"MODEL_DEPLOYER_CATALOG": str(path), "MODEL_DEPLOYER_HOST__ADDRESS": "192.0.2.1"}
    for args in (["demo-tiny", "--dry-run"], ["--list"]):
        result = CliRunner().invoke(cli.main, args, env=env)
        line = assert_clean_failure(result.stderr, result.exit_code)
        assert "catalog.yaml" in line
        assert not isinstance(result.exception, (AssertionError, TypeError))


BROKEN_CONFIGS = {
    "invalid-toml": b"[host\n",
    "not-utf8": b"\xff\xfe[host]\n",
    "huge-int": b"[host]\nport = " + b"9" * 4400 + b"\n",
    "deep": b"a = " + b"[" * 3000,
    "inf-margin": b"[policy]\ngpu_margin_gb = inf\n",
    "nul-key-file": b'[host]\nkey_file = "k\\u0000"\n',
    "unknown-user-home": b'[host]\nknown_hosts = "~no-such-user-here/kh"\n',
    "payload-dir": b'[remote]\nmodels_dir = "/opt/models;reboot"\n',
}


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
def test_cli_broken_config_file_is_exit_2_one_line(in_tmp: Path, name: str) -> None:
    path = in_tmp / "config.toml"
    path.write_bytes(BROKEN_CONFIGS[name])
    result = CliRunner().invoke(cli.main, ["demo-tiny", "--dry-run", "--config", str(path)])
    assert_clean_failure(result.stderr, result.exit_code)
    result = CliRunner().invoke(
        cli.main, ["demo-tiny", "--dry-run"], env={"MODEL_DEPLOYER_CONFIG": str(path)}
    )
    assert_clean_failure(result.stderr, result.exit_code)


def run_deploy_model(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "LANG": "C.UTF-8"}
    return subprocess.run(
        [str(DEPLOY_MODEL), *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(not DEPLOY_MODEL.exists(), reason="deploy-model is not installed")
def test_installed_cli_broken_catalog_and_config_exit_2_without_traceback(in_tmp: Path) -> None:
    catalog = in_tmp / "catalog.yaml"
    catalog.write_text(BROKEN_CATALOGS["impossible-date"])
    proc = run_deploy_model(
        ["demo-tiny", "--dry-run"], {"MODEL_DEPLOYER_CATALOG": str(catalog)}, in_tmp
    )
    line = assert_clean_failure(proc.stderr, proc.returncode)
    assert "catalog.yaml: not valid YAML" in line and proc.stdout == ""

    config = in_tmp / "config.toml"
    config.write_bytes(BROKEN_CONFIGS["not-utf8"])
    proc = run_deploy_model(["demo-tiny", "--dry-run", "--config", str(config)], {}, in_tmp)
    line = assert_clean_failure(proc.stderr, proc.returncode)
    assert "not UTF-8" in line and proc.stdout == ""
