"""Config arguments: `--config configs/x.py:trials=64,runlocal` (big_vision style)."""

from __future__ import annotations

from typing import Any

from jaxpoison.errors import UserInputError


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses "k1=v1,flag,k2=v2" against `defaults`, which fix the known keys and types.

    A bare key sets a boolean to True. Every config accepts `runlocal`.

    Raises:
      UserInputError: an unknown key or a value of the wrong type (one line).
    """
    defaults.setdefault("runlocal", False)
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise UserInputError(
                f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise UserInputError(
                    f"config argument {key!r} needs a value ({key}=...)"
                )
            out[key] = True
            continue
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif default is None:
                out[key] = value
            else:
                out[key] = type(default)(value)
        except ValueError:
            raise UserInputError(
                f"config argument {key}={value!r} is not of type "
                f"{type(default).__name__}"
            ) from None
    return out
