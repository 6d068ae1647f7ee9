"""The one error type that user-facing code raises for bad input.

The CLI turns a :class:`GptqlabError` into a one-line message and exit code 2, without a traceback.
Anything else that escapes is a bug in gptqlab.
"""


class GptqlabError(Exception):
    """Bad input from the user: a path, a flag, a file or a model that gptqlab cannot work with."""


class CalibrationError(GptqlabError):
    """The calibration spec or one of its files cannot be used."""


class CheckpointError(GptqlabError):
    """A checkpoint on disk is missing, malformed or inconsistent with its config."""


class ConfigError(GptqlabError, ValueError):
    """A configuration value is out of range; the message says which value and what is allowed."""


def printable(text: object) -> str:
    """``text`` with control characters (newlines, terminal escapes) written as escapes, so that a name a user
    supplied can never turn one message into several lines or repaint the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))
