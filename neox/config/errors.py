"""The one exception type every user-facing config problem raises."""


class ConfigError(ValueError):
    """A config problem the user can fix: the message names what, where and how."""
