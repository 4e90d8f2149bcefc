"""The check primitives of config validation: each raises `ConfigError` with one line naming the key,
the value and what is accepted.

`t3.config.validation` composes them into the training config's checks; eval's stage settings use
`check_field_types`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "check_choice",
    "check_field_types",
    "check_range",
    "check_schema_keys",
    "check_target_kwargs",
    "fail",
    "require",
]


class ConfigError(ValueError):
    """An impossible config value; the message is one line naming the key and the accepted range."""


def fail(key: str, value: Any, accepted: str) -> ConfigError:
    """The error ``<key>=<value>: <accepted>`` (to raise)."""
    return ConfigError(f"{key}={value!r}: {accepted}")


def check_range(
    cfg: DictConfig,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """The number at ``key`` lies in ``[low, high]`` (either bound open or absent)."""
    value = OmegaConf.select(cfg, key)
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise fail(key, value, f"must satisfy {lo}{key.rsplit('.', 1)[-1]}{hi}")


def check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    """The value at ``key`` is one of ``choices``."""
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise fail(key, value, f"must be one of {list(choices)}")


def require(cfg: DictConfig, key: str, what: str) -> Any:
    """The value at ``key``; a one-line error explaining ``what`` it should be if it is missing or null."""
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) is None:
        raise ConfigError(f"{key} is required: {what}")
    return OmegaConf.select(cfg, key)


def check_schema_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key of a schema node must be a field of its dataclass.

    Composition refuses unknown keys, but Hydra's ``+key=value`` (which its own error message suggests)
    opens the node and adds the key anyway: ``+optim.lrr=1e-4`` would then be accepted and ignored.
    """
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in fields and not (key == "hydra" and not prefix):  # Hydra's own node, if composed in
                near = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
                raise ConfigError(f"{prefix}{key}: unknown key{hint}; accepted: {sorted(fields)}")
    for key in node:
        child = node._get_node(key)  # no interpolation is resolved here
        if (
            isinstance(child, DictConfig)
            and not (key == "hydra" and not prefix)
            and not child._is_none()
            and not child._is_missing()
        ):
            check_schema_keys(child, f"{prefix}{key}.")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` must be to match the type hint ``hint`` (None if it does); unknown hints pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        problems = [_type_problem(value, option) for option in options]
        if None in problems:
            return None
        return " or ".join(p.removeprefix("must be ") for p in problems) + (
            " or null" if len(options) < len(args) else ""
        )
    if origin in (tuple, list) and args and args[0] in _TYPE_WORDS:
        if isinstance(value, (list, tuple)) and all(_type_problem(v, args[0]) is None for v in value):
            return None
        return f"a list of {_TYPE_WORDS[args[0]].removeprefix('an ').removeprefix('a ')}s"
    if hint not in _TYPE_WORDS:
        return None
    ok = (
        isinstance(value, bool)
        if hint is bool
        else isinstance(value, (int, float) if hint is float else hint) and not isinstance(value, bool)
    )
    return None if ok else _TYPE_WORDS[hint]


def check_field_types(settings: Any, prefix: str, names: dict[str, str] | None = None) -> None:
    """Check every field of a dataclass instance against its type hint (bool, int, float, str, optional,
    lists of those), so that a value of the wrong type fails here, naming its key, and not inside a model.

    Args:
        settings: A dataclass instance built from a config node.
        prefix: The node's key (``generation``): a field is reported as ``<prefix>.<field>``.
        names: Config keys of fields that come from elsewhere (``{"backend": "model.attention_backend"}``).

    Raises:
        ConfigError: ``<key>=<value>: must be <type>``.
    """
    for name, hint in typing.get_type_hints(type(settings)).items():
        value = getattr(settings, name)
        problem = _type_problem(value, hint)
        if problem is not None:
            key = (names or {}).get(name, f"{prefix}.{name}")
            shown = list(value) if isinstance(value, tuple) else value
            raise fail(key, shown, f"must be {problem}")


def check_target_kwargs(cfg: DictConfig, key: str, *, require_values: bool = True) -> None:
    """Bind a ``_target_`` config's keys to the target's signature: a misspelt reader argument fails now.

    With ``require_values``, a mandatory value left as ``???`` (a data path) fails now too.
    """
    node = OmegaConf.select(cfg, key)
    if node is None:
        return
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        raise fail(key, node, "must be a config with a _target_ (a dataset factory)")
    from hydra.utils import get_method

    try:
        target = get_method(node._target_)
    except Exception as err:  # Hydra wraps import errors of any kind
        raise ConfigError(f"{key}._target_={node._target_!r}: cannot be imported ({err})") from None
    names = [str(k) for k in node if not str(k).startswith("_")]
    if require_values:
        for name in names:
            if OmegaConf.is_missing(node, name):
                raise ConfigError(f"{key}.{name} is required: set it on the command line ({key}.{name}=...)")
    signature = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    unknown = [k for k in names if k not in signature.parameters]
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown argument of {node._target_}; accepted: {sorted(signature.parameters)}"
        )
