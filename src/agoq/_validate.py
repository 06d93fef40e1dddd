"""The one typed validation path of agoq's configs (plan tables, TOML, the torchtitan
``[agoq]`` section, :class:`agoq.train.TrainConfig`, QuantSpec).

Every check names the field it refuses (``where``) and shows the value it got. A value of
the wrong *type* raises :class:`ConfigTypeError`, a value of the right type but out of range
raises :class:`ValueError`. ``ConfigTypeError`` is both a ``TypeError`` and a
``ValueError``, so callers that caught ``ValueError`` for every bad config keep working.

Nothing here coerces: ``"false"`` is not a bool, ``True`` is not an int, ``4.0`` is not an
int and a string is not a list of strings.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (a ``TypeError`` that is also a ``ValueError``)."""


def describe(value: Any) -> str:
    """``str 'RMSNorm'``: the type and repr of a refused value, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_error(where: str, expected: str, value: Any) -> ConfigTypeError:
    return ConfigTypeError(f"{where}: expected {expected}, got {describe(value)}")


def expect_bool(value: Any, where: str) -> bool:
    """``value`` if it is a real bool (``"false"``, 0 and 1 are refused)."""
    if not isinstance(value, bool):
        raise _type_error(where, "true or false", value)
    return value


def expect_int(
    value: Any,
    where: str,
    *,
    low: int | None = None,
    high: int | None = None,
    allowed: Iterable[int] | None = None,
) -> int:
    """``value`` if it is an int (bools refused) in ``[low, high]`` / in ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(where, "an integer", value)
    if allowed is not None:
        allowed = tuple(allowed)
        if value not in allowed:
            raise ValueError(f"{where}: must be one of {list(allowed)}, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{where}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{where}: must be <= {high}, got {value}")
    return value


def expect_float(
    value: Any,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number (bools refused) in the range;
    ``low_open``/``high_open`` exclude the bound itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(where, "a number", value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{where}: must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{where}: must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def expect_str(value: Any, where: str, *, choices: Iterable[str] | None = None) -> str:
    """``value`` if it is a str (and one of ``choices`` when given)."""
    if not isinstance(value, str):
        raise _type_error(where, "a string", value)
    if choices is not None:
        choices = tuple(choices)
        if value not in choices:
            raise ValueError(f"{where}: must be one of {list(choices)}, got {value!r}")
    return value


def expect_str_list(value: Any, where: str) -> tuple[str, ...]:
    """``value`` as a tuple if it is a list/tuple of strings (a bare string is refused: it
    would be read as its characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _type_error(where, "a list of strings", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _type_error(f"{where}[{i}]", "a string", item)
    return tuple(value)


def expect_list(value: Any, where: str) -> list[Any]:
    """``value`` as a list if it is a list or tuple (not a string, not a table)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _type_error(where, "a list", value)
    return list(value)


def expect_regex(value: Any, where: str) -> str:
    """``value`` if it is a str that compiles as a Python regular expression."""
    expect_str(value, where)
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{where}: invalid regular expression {value!r}: {e}") from None
    return value


def expect_table(value: Any, where: str, *, keys: Iterable[str] | None = None) -> Mapping[str, Any]:
    """``value`` if it is a mapping with string keys, all of them in ``keys`` when given."""
    if not isinstance(value, Mapping):
        raise _type_error(where, "a table", value)
    for key in value:
        if not isinstance(key, str):
            raise _type_error(f"{where} key", "a string", key)
    if keys is not None:
        keys = tuple(keys)
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(keys)}")
    return value


def _looks_like_toml(text: str) -> bool:
    """True when ``text`` can only be meant as TOML, not as a file name."""
    return "\n" in text or "=" in text or text.lstrip().startswith(("[", "#")) or not text.strip()


def read_toml(source: str | os.PathLike[str], where: str) -> dict[str, Any]:
    """Parse a TOML file (a path, or a string naming an existing file) or TOML text.

    A ``Path``, or a one-line string that cannot be TOML (no ``=``, no table header), is a
    file name: ``FileNotFoundError`` when it does not exist. Bad TOML raises ``ValueError``
    naming the source and the position.
    """
    import tomllib

    if isinstance(source, os.PathLike):
        path: Path | None = Path(source)
    elif isinstance(source, str):
        path = Path(source) if not _looks_like_toml(source) or os.path.isfile(source) else None
    else:
        raise _type_error(where, "a TOML file path or TOML text", source)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such TOML file: {str(path)!r}")
        text, name = path.read_text(encoding="utf-8"), str(path)
    else:
        text, name = source, "TOML text"
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: invalid TOML in {name}: {e}") from None
