"""true / false is no number (session 8): every int or float key of every config section, found
by introspection (a new key is covered as it is added), refuses a boolean with a ConfigError
naming the key, from a YAML file and from a ``key=value`` override alike. (Python's bool is an
int: without the check ``temperature: true`` would read as 1.0.)"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest

from aurl.config import Config, load_config
from aurl.errors import ConfigError


def numeric(tp) -> bool:
    return tp in (int, float) or any(numeric(a) for a in typing.get_args(tp) if a is not ...)


def with_true(tp):
    """A value of type ``tp`` whose numbers are all ``True`` (the first one at least)."""
    if tp in (int, float):
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return with_true(next(a for a in args if numeric(a)))
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is ...:
            return [with_true(args[0])]
        return [with_true(a) if numeric(a) else "a" for a in args]
    raise AssertionError(f"no value for {tp}")


def numeric_keys(cls=Config, prefix=""):
    """(dotted key, annotation) of every int / float key under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_keys(tp, f"{prefix}{f.name}.")
        elif numeric(tp):
            yield f"{prefix}{f.name}", tp


KEYS = list(numeric_keys())


def test_the_introspection_finds_the_numbers():
    keys = dict(KEYS)
    assert (
        len(keys) > 80 and "generation.temperature" in keys and "data.augment.stretch_min" in keys
    )
    assert "generation.tempo_range" in keys and "data.curriculum" in keys


@pytest.mark.parametrize("key, tp", KEYS, ids=[k for k, _ in KEYS])
def test_a_boolean_for_a_number_names_the_key(tmp_path, key, tp):
    value = json.dumps(with_true(tp))
    with pytest.raises(ConfigError, match=rf"{key}(\[\d+\])*: expected") as e:
        load_config(overrides=[f"{key}={value}"])
    assert "True" in str(e.value) or "true" in str(e.value)
    *sections, name = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    path = tmp_path / "c.yaml"
    path.write_text(text + f"{'  ' * len(sections)}{name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{key}(\[\d+\])*: expected"):
        load_config(path)
