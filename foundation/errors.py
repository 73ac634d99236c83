"""The base of every error fedpa reports to a user.

It lives in the lowest room (every other room depends on `foundation`), so
that the CLI can tell a user's mistake (print it, exit non-zero, no traceback)
from a bug (let it raise).
"""


class FedpaError(Exception):
    """A problem with the user's input, files or configuration; the message says what and where."""


class ConfigError(FedpaError):
    """A foundation/adapter configuration value is missing or inconsistent."""


class RoutingError(FedpaError):
    """A batch cannot be routed to adapters (unknown user, group value out of range, ...)."""
