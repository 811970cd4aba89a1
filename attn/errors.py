"""Errors a user can hit from a config: raised before data is built or anything compiles."""

from collections.abc import Iterable


class ConfigError(ValueError):
  """A config that cannot run; the message names the field (`model.attention`), what is wrong
  and the fix. A ValueError, so callers that caught ValueError keep working."""


def check_choice(field: str, value: object, allowed: Iterable[str]) -> None:
  """Raises ConfigError unless `value` is one of `allowed`; the message names `field` (e.g.
  `model.norm`) and lists the valid values, in their order."""
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is not one of {allowed}.")
