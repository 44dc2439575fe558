"""Typed configs: one pydantic class per command, YAML files plus dotted overrides.

Every field carries a docstring (pydantic's ``use_attribute_docstrings``), which becomes
its ``--help`` text.  Loading never shows a traceback for a user mistake: it raises
:class:`ConfigError` with one line naming the key and what was expected, and the CLI
turns that into exit code 2.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kilter.errors import ConfigError

__all__ = [
    "BaseConfig",
    "ConfigError",
    "Field",
    "load_config",
    "parse_overrides",
    "describe_fields",
    "dump_config",
]


class BaseConfig(BaseModel):
    """Base for every command config: unknown keys are errors, field docstrings are help."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,  # optim.lr=.inf would train every weight to inf
        use_attribute_docstrings=True,
        validate_assignment=True,
        protected_namespaces=(),
        # `output_dir=2024` or a YAML `model: 12` name folders, not numbers.
        coerce_numbers_to_str=True,
    )


# --------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML says so;
    PyYAML would keep the last value silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # an unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str):
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass


def read_text_file(path: Path, what: str) -> str:
    """A text file's contents as UTF-8 (a BOM is allowed); any other encoding is a ConfigError naming the byte."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None


# --------------------------------------------------------------------------- overrides


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would ("1e-4" -> float, "true" -> bool)."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str], cls: type[BaseModel] | None = None) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "--seed", "3", "--lora.r=8"]`` into a nested dict.

    A bare ``--flag`` means ``flag=true``; with ``cls`` given, a bare flag naming a field
    that is not a boolean is an error (pydantic would otherwise read ``true`` as 1).
    """
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--") and "=" not in items[i + 1]:
                value = items[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag switches a boolean on
                info = _field_for(cls, tuple(key.replace("-", "_").split("."))) if cls is not None else None
                if info is not None and info.annotation not in (bool, bool | None):
                    raise ConfigError(f"--{key} needs a value: expected {_type_name(info.annotation)}")
            pairs.append((key.replace("-", "_"), value))
        elif "=" in item:
            key, value = item.split("=", 1)
            pairs.append((key, value))
        else:
            raise ConfigError(f"cannot read argument {item!r}: expected key=value or --key value")
        i += 1
    nested: dict[str, Any] = {}
    for key, value in pairs:
        if not key:
            raise ConfigError(f"empty key in override {key}={value!r}")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier value for {part!r}")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- loading


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _field_for(cls: type[BaseModel], loc: tuple) -> Any:
    """The FieldInfo addressed by a pydantic error location, or None."""
    model: Any = cls
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return info
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        model = info.annotation
        for arg in typing.get_args(model) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    return info


def _key_name(cls: type[BaseModel], loc: tuple) -> str:
    """The dotted key of an error location, without pydantic's union-member tags ("list[str]")."""
    parts: list[str] = []
    model: Any = cls
    for part in loc:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if isinstance(part, str) and part in fields:
            parts.append(part)
            model = fields[part].annotation
            for arg in typing.get_args(model) or ():
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
        elif isinstance(part, int):
            parts.append(str(part))
            model = None
    return ".".join(parts) or "<root>"


def _format_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "<root>"
    kind = first["type"]
    where = f" (in {source})" if source else ""
    if kind == "extra_forbidden":
        parent = _field_for(cls, loc[:-1]) if len(loc) > 1 else None
        model = parent.annotation if parent is not None else cls
        known = sorted(getattr(model, "model_fields", {}).keys())
        hint = f"; known keys: {', '.join(known)}" if known else ""
        return f"unknown config key {key!r}{where}{hint}"
    info = _field_for(cls, loc)
    key = _key_name(cls, loc)
    expected = f"expected {_type_name(info.annotation)}" if info is not None else first["msg"]
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    if kind == "missing":
        return f"config key {key!r}{where} is required ({expected}); set it in the YAML file or as {key}=..."
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error", "literal_error"}:
        return f"config key {key!r}{where}: {first['msg']}{got_text}"
    return f"config key {key!r}{where}: {expected}{got_text}"


def _section_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """The values a section's *default instance* sets beyond its class defaults, recursively.

    ``optim: OptimConfig = OptimConfig(lr=1e-5, schedule="constant")`` documents PPO's defaults;
    validating ``{"optim": {"lr": 3e-4}}`` alone would rebuild the section from OptimConfig's class
    defaults and silently switch the schedule to cosine.  Seeding the data with these values first
    keeps every default that the user did not override.
    """
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        default = field.default
        if isinstance(default, BaseModel):
            nested = _deep_merge(_section_defaults(type(default)), default.model_dump(exclude_unset=True))
            if nested:
                out[name] = nested
    return out


def load_config(cls: type[BaseModel], path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Build ``cls`` from an optional YAML file and overrides; raise ConfigError on any problem."""
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = load_yaml(read_text_file(p, "config file"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping of keys to values at the top level")
        data = loaded
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides), cls)
        data = _deep_merge(data, extra)
        if source:
            source += " + overrides"
    seeded = _section_defaults(cls)
    if seeded:
        # a section given as anything but a mapping is left to validation to reject
        data = {**data, **{k: _deep_merge(v, data[k]) for k, v in seeded.items() if isinstance(data.get(k), dict)}}
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(cls, err, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(cls: type[BaseModel], prefix: str = "", instance: BaseModel | None = None
                    ) -> list[tuple[str, str, str, str]]:
    """Rows of (key, type, default, help) for every field, nested sections flattened.

    A nested section shows the defaults of the section's default *instance* (PPO's optimizer
    starts at lr 1e-5, not at OptimConfig's class default).  A config may refine the help of
    fields it inherits with a ``help_overrides`` class attribute ({field: text}).
    The default of a field without one reads ``required``.
    """
    rows = []
    overrides: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass refines what its bases say
        overrides.update(vars(klass).get("help_overrides", {}) or {})
    for name, info in cls.model_fields.items():
        ann = info.annotation
        default = getattr(instance, name) if instance is not None else info.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, prefix + name + ".", default if isinstance(default, ann) else None))
            continue
        shown = "required" if info.is_required() else repr(default)
        rows.append((prefix + name, _type_name(ann), shown, (overrides.get(name) or info.description or "").strip()))
    return rows
