"""The one family of errors steer raises for bad input.

Every message names the problem and the fix. Subclassing ``ValueError``/``TypeError`` lets callers
that already catch those keep working.
"""


class SteerError(Exception):
    """Base class of every error steer raises on purpose."""


class SteerValueError(SteerError, ValueError):
    """An argument has the right type but a wrong value (unknown layer, empty list, NaN)."""


class SteerTypeError(SteerError, TypeError):
    """An argument has the wrong type (a tokenizer where a model was expected, a non-file)."""
