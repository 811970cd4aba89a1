"""One wording for "this path cannot run these arguments", shared by every implementation."""

from collections.abc import Mapping


def unsupported(what: str, used: Mapping[str, bool]) -> str | None:
  """'`what` does not support a, b' naming the arguments in use, or None if none is."""
  named = [name for name, in_use in used.items() if in_use]
  return f"{what} does not support {', '.join(named)}" if named else None
