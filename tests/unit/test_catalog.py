"""The catalog loads into typed objects; bad entries fail with one line naming entry and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployer.catalog import (
    DEFAULT_CATALOG,
    Precision,
    Tier,
    WeightFormat,
    check_model_name,
    load_catalog,
    parse_catalog,
)
from deployer.errors import CatalogError

SEED_MODELS = {
    "mistral_policy_analysis",
    "mistral_iac_generation",
    "qwen3-14b",
    "qwen3-14b-awq",
    "qwen3-coder-30b",
    "deepseek-r1-8b",
    "demo-tiny",
}


def base_entry(**over: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "tier": "raw",
        "s3_prefix": "models/m/",
        "parameters_b": 1.0,
        "size_gb": 2.0,
    }
    entry.update(over)
    return entry


def catalog_with(entry: dict[str, object], name: str = "m") -> dict[str, object]:
    return {"bucket": "asoba-llm-cache", "models": {name: entry}}


def test_every_seed_model_loads() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    assert set(catalog.models) == SEED_MODELS
    assert catalog.bucket == "asoba-llm-cache"
    for name, spec in catalog.models.items():
        assert spec.name == name
        assert spec.s3_prefix.endswith("/")


def test_seed_facts_from_the_deployment_doc() -> None:
    catalog = load_catalog()
    qwen = catalog.get("qwen3-14b")
    assert qwen.tier is Tier.production
    assert qwen.size_gb == 28.0
    variant = catalog.awq_variant_of(qwen)
    assert variant is not None and variant.name == "qwen3-14b-awq"
    assert variant.format is WeightFormat.awq and variant.precision is Precision.int4
    assert catalog.get("mistral_iac_generation").size_gb < 1
    assert catalog.get("qwen3-coder-30b").size_gb == 62.0
    assert qwen.bootstrap is not None
    assert (DEFAULT_CATALOG.parent / qwen.bootstrap.script).is_file()


def test_unknown_model_suggests_close_names() -> None:
    catalog = load_catalog()
    with pytest.raises(CatalogError, match=r"unknown model 'qwen3-14' \(did you mean 'qwen3-14b'"):
        catalog.get("qwen3-14")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"tier": "raw", "s3_prefix": "models/m/", "size_gb": 2.0}, r"models\.m\.parameters_b"),
        (base_entry(size_gb=0), r"models\.m\.size_gb: Input should be greater than 0"),
        (base_entry(size_gb="big"), r"models\.m\.size_gb"),
        (base_entry(tier="gold"), r"models\.m\.tier: Input should be"),
        (base_entry(s3_prefix="models/../etc/"), r"models\.m\.s3_prefix"),
        (base_entry(s3_prefix="models/m"), r"models\.m\.s3_prefix"),
        (base_entry(colour="red"), r"models\.m\.colour: unknown key"),
        (base_entry(awq_variant="nope"), r"models\.m\.awq_variant: no model 'nope'"),
        (base_entry(format="awq"), r"models\.m: .*precision 'int4'"),
        (base_entry(context_length=12), r"models\.m\.context_length"),
        (base_entry(tool_call_parser="hermes --x"), r"models\.m\.tool_call_parser: .*parser"),
        (base_entry(tool_call_parser="$(id)"), r"models\.m\.tool_call_parser"),
    ],
)
def test_malformed_entries_are_rejected_naming_entry_and_field(
    entry: dict[str, object], expected: str
) -> None:
    with pytest.raises(CatalogError, match=expected) as info:
        parse_catalog(catalog_with(entry))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["a;rm -rf /", "$(id)", "`id`", "two words", "../etc", "..", "-flag", "a/b", "", "x" * 65],
)
def test_names_with_shell_metacharacters_are_rejected(name: str) -> None:
    with pytest.raises(CatalogError, match="invalid model name"):
        check_model_name(name)
    with pytest.raises(CatalogError, match="invalid model name"):
        parse_catalog(catalog_with(base_entry(), name=name))


def test_bootstrap_script_must_exist(tmp_path: Path) -> None:
    data = catalog_with(base_entry(bootstrap={"script": "scripts/bootstrap/missing.sh"}))
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError, match=r"models\.m\.bootstrap\.script: no file"):
        load_catalog(path)


def test_bootstrap_script_outside_repo_rejected() -> None:
    with pytest.raises(CatalogError, match=r"bootstrap\.script: .*inside the repository"):
        parse_catalog(catalog_with(base_entry(bootstrap={"script": "../x.sh"})))


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "nope.yaml")
    bad = tmp_path / "catalog.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(bad)
    bad.write_text("- a list\n")
    with pytest.raises(CatalogError, match="expected a mapping"):
        load_catalog(bad)
