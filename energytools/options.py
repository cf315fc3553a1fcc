"""How options are declared and resolved: :func:`option` declares a config field (its CLI help,
and for names picked from a registry the registry), :func:`resolve` builds a config from a
dict of values (defaults -> recipe or config file -> CLI flags, each value type-checked, with
one line naming the key), :func:`as_dict` gives it back as plain values. The stage configs
themselves are in energytools.config.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path

from .errors import UserError, option_name


def option(default=dataclasses.MISSING, help: str = "", factory=dataclasses.MISSING, choices=None, parse=None,
           content: bool = True, panel: str | None = None, resume_may_change: bool = False):
    """A config field with its CLI help text (``factory`` for a nested config's default).
    ``choices``, for a name picked from a registry: a callable giving the names, read when a
    config is resolved (registries fill as modules import), so that :func:`resolve` can take
    other spellings of them. ``parse(value, where)``, for a value with more than one spelling
    (``32`` or ``"32"`` or ``"data"``): gives the field's canonical value before the type check,
    or raises one UserError naming ``where``. ``content=False`` marks an option that does not
    change what a stage writes (where its output goes, whether it may replace or resume it, how
    many processes write it): staleness keys, resume keys and config hashes leave it out
    (:func:`content_of`). ``panel``: the group its flag is listed in by ``--help`` (on a nested
    config's field: the group of all its options that name none). ``resume_may_change``: a
    resumed run may take another value than the run was started with (more epochs, another
    device, an input path whose content the run's config compares by hash;
    :func:`resume_may_change_keys`)."""
    return field(default=default, default_factory=factory,
                 metadata={"help": help, "choices": choices, "parse": parse, "content": content, "panel": panel,
                           "resume_may_change": resume_may_change})


def flag(name: str) -> str:
    """An option's command-line spelling: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def require(config, name: str, ok: bool, rule: str, value=dataclasses.MISSING) -> None:
    """Refuse option ``name`` of ``config`` unless ``ok``: one line naming it (its flag from the
    command line, its keyword from Python: energytools.errors.option), what it must be and the
    value given (``value``, or the option's own)."""
    if not ok:
        value = getattr(config, name) if value is dataclasses.MISSING else value
        shown = repr(value) if isinstance(value, str) else list(value) if isinstance(value, tuple) else value
        raise UserError(f"{option_name(name)} must be {rule}, got {shown}")


def registry(names):
    """``choices`` read from a registry (a dict or tuple of names) when a config is resolved, so
    that entries registered later (a user's dataset or model) are choices too."""
    return lambda: names


def _fold(name: str) -> str:
    return re.sub(r"[\s_-]", "", name.lower())


def canonical_name(value: str, names) -> str:
    """``value`` as the registry spells it when it differs only in case, ``-``, ``_`` or spaces
    ("Energy_KD" -> "energy-kd", "FashionMNIST" -> "fashion-mnist", "CNN-small" -> "cnn_small");
    anything else unchanged, for the stage's own check to refuse with the list of names."""
    names = list(names)
    if value in names:
        return value
    matches = [name for name in names if _fold(name) == _fold(value)]
    return matches[0] if len(matches) == 1 else value


# --- resolving a config from a dict --------------------------------------------------------

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_config(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _optional(hint):
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _describe(hint) -> str:
    hint, _ = _optional(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def convert(value, hint, where: str):
    """``value`` checked against the type ``hint`` (and converted: int -> float, list -> tuple,
    "6,4,2" -> (6.0, 4.0, 2.0)); a mismatch is one UserError naming ``where``."""
    base, optional = _optional(hint)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} must be {_describe(hint)}, got nothing")
    if _is_config(base):
        if isinstance(value, base):
            return value
        if isinstance(value, dict):
            return resolve(base, value, where)
    elif typing.get_origin(base) is tuple:
        (item,) = [a for a in typing.get_args(base) if a is not Ellipsis]
        if isinstance(value, str) and item is not str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(convert(_number(v) if item in (int, float) else v, item, where) for v in value)
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, (str, Path)):
            return str(value)
    else:
        return value
    raise UserError(f"{where} must be {_describe(hint)}, got {value!r}")


def _number(text):
    """A comma-list item: a number when it reads as one (convert() then checks the type)."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve(cls, values: dict, where: str = "config", partial: bool = False):
    """Build dataclass ``cls`` from ``values``.

    Keys of nested config fields may be given flat (``epochs`` for ``train.epochs``), as the CLI
    and the API do, or as a nested dict, as a recipe may. Unknown keys are refused with the
    nearest valid one; every value is type-checked; names picked from a registry take their
    registry's spelling (:func:`canonical_name`). ``partial``: only check ``values`` (a part of
    a config, such as a ``--config`` file that flags complete) and return None.
    """
    hints = _hints(cls)
    own = {f.name: f for f in dataclasses.fields(cls)}
    nested = {name: _optional(hints[name])[0] for name in own if _is_config(_optional(hints[name])[0])}
    routed: dict[str, dict] = {name: {} for name in nested}
    kwargs = {}
    for key, value in values.items():
        if key in own:
            if key in nested and isinstance(value, dict):
                routed[key].update(value)
            else:
                parse = own[key].metadata.get("parse")
                if parse is not None and value is not None:
                    value = parse(value, f"{where}: {key}")
                kwargs[key] = convert(value, hints[key], f"{where}: {key}")
                choices = own[key].metadata.get("choices")
                if choices is not None and isinstance(kwargs[key], str):
                    kwargs[key] = canonical_name(kwargs[key], choices())
            continue
        owner = next((name for name, sub in nested.items() if key in flat_names(sub)), None)
        if owner is None:
            near = difflib.get_close_matches(key, sorted(flat_names(cls)), n=1)
            raise UserError(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        routed[owner][key] = value
    for name, sub_values in routed.items():
        if sub_values:
            base = kwargs.get(name)
            start = as_dict(base) if base is not None else {}
            kwargs[name] = resolve(nested[name], {**start, **sub_values}, where, partial)
    if partial:
        return None
    missing = [f.name for f in own.values() if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: {missing[0]} is required")
    return cls(**kwargs)


def flat_names(cls) -> list[str]:
    """Every key :func:`resolve` accepts for ``cls`` at the top level."""
    hints = _hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        base = _optional(hints[f.name])[0]
        names += flat_names(base) if _is_config(base) else [f.name]
    return names


def flat_fields(cls) -> list[tuple[dataclasses.Field, object]]:
    """``(field, type hint)`` of every leaf option of ``cls``, nested configs flattened."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base = _optional(hints[f.name])[0]
        out += flat_fields(base) if _is_config(base) else [(f, hints[f.name])]
    return out


def check_all(config) -> None:
    """``check()`` of every nested config, then of ``config``: the checks a stage makes before work."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_all(value)
    if hasattr(config, "check"):
        config.check()


def flat_panels(cls, inherited: str | None = None) -> dict[str, str | None]:
    """Each leaf option's help panel: its own, else that of the nested config it lies in."""
    hints, panels = _hints(cls), {}
    for f in dataclasses.fields(cls):
        panel, base = f.metadata.get("panel") or inherited, _optional(hints[f.name])[0]
        panels.update(flat_panels(base, panel) if _is_config(base) else {f.name: panel})
    return panels


def as_dict(obj) -> dict:
    """A config as plain JSON-able values (nested configs as dicts, tuples as lists)."""
    return {f.name: as_dict_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def content_of(config) -> dict:
    """``as_dict(config)`` without the options marked ``content=False`` (in nested configs too):
    what decides a stage's output."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("content", True):
            continue
        value = getattr(config, f.name)
        out[f.name] = content_of(value) if dataclasses.is_dataclass(value) else as_dict_value(value)
    return out


def resume_may_change_keys(config, prefix: str = "") -> set[str]:
    """The dotted keys (``train.epochs``) of the options marked ``resume_may_change``, in
    ``config`` (a config class or instance) and its nested configs."""
    keys = set()
    hints = typing.get_type_hints(config if isinstance(config, type) else type(config))
    for f in dataclasses.fields(config):
        base = _optional(hints[f.name])[0]
        if _is_config(base):
            keys |= resume_may_change_keys(base, f"{prefix}{f.name}.")
        elif f.metadata.get("resume_may_change"):
            keys.add(prefix + f.name)
    return keys


def as_dict_value(value):
    """One config value as plain JSON-able data."""
    if dataclasses.is_dataclass(value):
        return as_dict(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def to_toml(values: dict) -> str:
    """A config dict (:func:`as_dict`) as TOML that ``--config`` and recipes read back: scalars
    first, nested configs as ``[tables]``; unset (None) options are left out."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables:
        body = to_toml({f"{key}.{k}" if isinstance(v, dict) else k: v for k, v in table.items()})
        if body:  # a group none of whose options is set is left out
            lines += ["", body if body.startswith("[") else f"[{_toml_key(key)}]\n{body}"]
    return "\n".join(lines).strip("\n")


def _toml_key(key: str) -> str:
    return ".".join(part if part.replace("_", "").replace("-", "").isalnum() else json.dumps(part)
                    for part in key.split("."))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else "-inf" if value < 0 else "inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    # a JSON string is a TOML basic string, once DEL is escaped too (and no surrogate pairs are made)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def overrides(**flags) -> dict:
    """The values the user actually set (None means "not given")."""
    return {k: v for k, v in flags.items() if v is not None}
