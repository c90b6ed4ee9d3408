"""The model catalog: which models exist, where their weights live, what they are.

``catalog.yaml`` is loaded into typed, validated objects before any connection opens. Unknown
keys are errors, names are restricted to a character set that is safe in paths and shell
arguments, and every error names the entry and the field.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import EngineChoice
from .errors import CatalogError
from .operator_input import describe, did_you_mean, printable, read_operator_file

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
S3_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}/$")
SCRIPT_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,254}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
TOOL_PARSER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalog.yaml"


def check_model_name(name: str) -> str:
    """Raise CatalogError unless ``name`` is a safe model name."""
    if not MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise CatalogError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


class Tier(StrEnum):
    production = "production"  # tier 1: known good, auto-deploy
    raw = "raw"  # tier 2: raw weights, generic deploy
    demo = "demo"  # the sandbox's tiny model


class WeightFormat(StrEnum):
    safetensors = "safetensors"
    awq = "awq"  # pre-quantized AWQ 4-bit safetensors


class Precision(StrEnum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"
    int4 = "int4"


class Bootstrap(BaseModel):
    """A script from this repository run on the host at one step of the deploy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    script: str
    step: Literal["after-pull", "before-start", "after-start"] = "before-start"

    @field_validator("script")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a path inside the repository")
        if not SCRIPT_RE.fullmatch(value):
            raise ValueError("must be a relative path of letters, digits, '.', '_', '-' and '/'")
        return value


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    tier: Tier
    s3_prefix: Annotated[str, Field(description="key prefix in the bucket, ending in '/'")]
    format: WeightFormat = WeightFormat.safetensors
    precision: Precision = Precision.bf16
    parameters_b: Annotated[float, Field(gt=0, le=2000)]
    size_gb: Annotated[float, Field(gt=0, le=5000)]
    context_length: Annotated[int, Field(ge=128, le=1_048_576)] = 4096
    awq_variant: str | None = None
    bootstrap: Bootstrap | None = None
    revision: str | None = None
    # auto: the policy's engine decides (``[policy] engine``); vllm | transformers pin it.
    engine: EngineChoice = "auto"
    # vLLM's parser for this model's tool calls (``--tool-call-parser``: hermes for Qwen and
    # other ChatML models, llama3_json, mistral, ...): tools and tool_choice on /v1 need one.
    tool_call_parser: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return check_model_name(value)
        except CatalogError as exc:
            raise ValueError(exc.message) from None

    @field_validator("s3_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not S3_PREFIX_RE.fullmatch(value) or ".." in value or "//" in value:
            raise ValueError("must look like 'models/<name>/' (letters, digits, ._-/, ending '/')")
        return value

    @field_validator("tool_call_parser")
    @classmethod
    def _tool_parser(cls, value: str | None) -> str | None:
        if value is not None and not TOOL_PARSER_RE.fullmatch(value):
            raise ValueError("must be a vLLM parser name: lower-case letters, digits, '_', '-'")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME_RE.fullmatch(value):
            raise ValueError("must use letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.format is WeightFormat.awq and self.precision is not Precision.int4:
            raise ValueError("format 'awq' weights have precision 'int4'")
        if self.format is WeightFormat.awq and self.awq_variant:
            raise ValueError("a pre-quantized AWQ model cannot name an awq_variant")
        return self

    @property
    def is_prequantized(self) -> bool:
        return self.format is WeightFormat.awq


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    models: dict[str, ModelSpec]
    source: str = "catalog.yaml"

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not BUCKET_RE.fullmatch(value):
            raise ValueError("not a valid S3 bucket name")
        return value

    @model_validator(mode="after")
    def _links(self) -> Catalog:
        for name, spec in self.models.items():
            if spec.awq_variant is None:
                continue
            variant = self.models.get(spec.awq_variant)
            if variant is None:
                raise ValueError(
                    f"models.{name}.awq_variant: no model {spec.awq_variant!r} in the catalog"
                    + did_you_mean(spec.awq_variant, self.models)
                )
            if not variant.is_prequantized:
                raise ValueError(
                    f"models.{name}.awq_variant: {spec.awq_variant!r} is not format 'awq'"
                )
        return self

    def get(self, name: str) -> ModelSpec:
        check_model_name(name)
        try:
            return self.models[name]
        except KeyError:
            raise CatalogError(
                f"unknown model {name!r}{did_you_mean(name, self.models)}",
                hint="`deploy-model --list` shows the catalog",
            ) from None

    def awq_variant_of(self, spec: ModelSpec) -> ModelSpec | None:
        return self.models[spec.awq_variant] if spec.awq_variant else None


def parse_catalog(data: object, *, source: str = "catalog.yaml") -> Catalog:
    """Validate already-parsed YAML. Entry names become each spec's ``name``."""
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: expected a mapping with 'bucket' and 'models'")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise CatalogError(f"{source}: models: expected a non-empty mapping of model entries")
    entries: dict[str, object] = {}
    for name, entry in models.items():
        name = str(name)
        shown = printable(name)  # the key is not checked yet: keep the message one line
        if not isinstance(entry, dict):
            raise CatalogError(f"{source}: models.{shown}: expected a mapping of fields")
        if "name" in entry and entry["name"] != name:
            raise CatalogError(f"{source}: models.{shown}.name: differs from the entry's key")
        try:
            check_model_name(name)
        except CatalogError as exc:
            raise CatalogError(f"{source}: models.{shown}: {exc.message}") from None
        entries[name] = {**entry, "name": name}
    try:
        return Catalog.model_validate({**data, "models": entries, "source": source})
    except ValidationError as exc:
        raise CatalogError(describe(exc, source=source)) from None


def load_catalog(path: Path | str | None = None) -> Catalog:
    path = Path(path) if path else DEFAULT_CATALOG
    source = printable(path.name)
    text = read_operator_file(path, kind="catalog", label=source, error=CatalogError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise CatalogError(f"{source}{where}: not valid YAML") from None
    except RecursionError:
        raise CatalogError(f"{source}: not valid YAML: nested too deeply") from None
    except Exception as exc:
        # PyYAML's constructors let plain Python errors out for well-formed but impossible
        # scalars: ValueError for a date like 2024-13-45, `!!int abc` or an integer of more
        # than 4300 digits; AttributeError, KeyError, IndexError for `!!timestamp x`,
        # `!!bool x`, a bare `!!int`. Each means a value that cannot be read.
        reason = str(exc).partition(";")[0] if isinstance(exc, ValueError) else ""
        detail = f" ({printable(reason)})" if reason else ""
        raise CatalogError(f"{source}: not valid YAML: a value cannot be read{detail}") from None
    catalog = parse_catalog(data, source=source)
    root = path.resolve().parent
    for name, spec in catalog.models.items():
        if spec.bootstrap and not _is_file(root / spec.bootstrap.script):
            raise CatalogError(
                f"{source}: models.{name}.bootstrap.script: no file {spec.bootstrap.script}"
            )
    return catalog


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system
        return False
