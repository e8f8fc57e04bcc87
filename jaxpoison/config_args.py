"""Config arguments: `--config configs/x.py:trials=64,runlocal` (big_vision style)."""

from __future__ import annotations

from typing import Any

from jaxpoison.errors import UserInputError


class ConfigArgs(dict):
    """Parsed config arguments; `given` holds the keys the command line named."""

    given: frozenset[str] = frozenset()

    def local(self, key: str, value: Any) -> Any:
        """`value` (a variant's choice, e.g. runlocal's size) unless `key` was given.

        A variant such as `runlocal` never silently overrides an argument the user
        wrote: `quickstart.py:runlocal,num_targets=50` runs 50 targets.
        """
        if key not in self:
            raise KeyError(f"no config argument {key!r}")
        return self[key] if key in self.given else value


def parse_arg(arg: str | None, **defaults: Any) -> ConfigArgs:
    """Parses "k1=v1,flag,k2=v2" against `defaults`, which fix the known keys and types.

    A bare key sets a boolean to True. Every config accepts `runlocal`.

    Raises:
      UserInputError: an unknown key or a value of the wrong type (one line).
    """
    defaults.setdefault("runlocal", False)
    out = ConfigArgs(defaults)
    given = set()
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise UserInputError(
                f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        given.add(key)
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
    out.given = frozenset(given)
    return out
