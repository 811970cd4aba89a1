"""Errors a user can hit from a config: raised before data is built or anything compiles."""


class ConfigError(ValueError):
  """A config that cannot run; the message names the field (`model.attention`), what is wrong
  and the fix. A ValueError, so callers that caught ValueError keep working."""
