"""Exception types raised by mitk.

Every error a caller can trigger with bad input is a subclass of both
``MitkError`` and the built-in type a Python user would expect (``ValueError``
for bad values and shapes, ``KeyError`` for unknown names), so existing
``except ValueError`` code keeps working. Shape mismatches are also
``AssertionError``s, because TransformerLens asserts its shapes and code
written against it catches (and its tests expect) ``AssertionError``.
"""

from __future__ import annotations

from collections.abc import Iterable
import difflib


class MitkError(Exception):
    """Base class for every error mitk raises on purpose."""


class ConfigError(MitkError, ValueError):
    """A configuration field is missing, out of range or inconsistent."""


class InvalidTokensError(MitkError, ValueError):
    """Token ids have the wrong dtype, rank or lie outside ``[0, d_vocab)``."""


class SequenceTooLongError(MitkError, ValueError):
    """The input is longer than the model's positional scheme supports."""


class ShapeMismatchError(MitkError, ValueError, AssertionError):
    """A tensor (an input, or a hook's replacement) has the wrong shape.

    Also an ``AssertionError``, which is what TransformerLens's shape checks raise.
    """


class HookError(MitkError, ValueError):
    """A hook was registered in a way that could not fire as asked."""


class HookReplacementError(HookError, ShapeMismatchError):
    """A hook returned something other than a tensor of its activation's dtype, device and shape.

    A ``HookError`` raised at the hook point, so the message names it; also a
    ``ShapeMismatchError`` (and so an ``AssertionError``), which is what a wrong
    shape raised before dtype and device were checked too.
    """


class UnsupportedModelError(MitkError, ValueError):
    """A checkpoint uses an architecture or option mitk cannot reproduce."""


class ModelFileError(MitkError, ValueError):
    """A model directory's file is unreadable, malformed, outside the directory, or its
    tensors are missing or mis-shaped; the message names the file and the tensor or field."""


class ModelTooLargeError(MitkError, MemoryError):
    """A model would need more memory than is available (or than the user allowed).

    Raised from the config alone, before any weight is allocated; the message gives
    the estimate and the limit it was compared with.
    """


class UnknownNameError(MitkError, KeyError):
    """A name (a hook, a pretrained SAE release or id, ...) does not exist.

    The message lists the closest valid names so a typo is one glance away.
    """

    def __init__(self, name: str, valid: Iterable[str], what: str = "name") -> None:
        valid = list(valid)
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.name = name
        self.suggestions = close
        super().__init__(f"unknown {what} {name!r}{hint} ({len(valid)} valid names exist)")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class UnknownHookError(UnknownNameError):
    """A hook name does not exist on this model; the message lists the closest valid names."""

    def __init__(self, name: str, valid: Iterable[str], what: str = "hook name") -> None:
        super().__init__(name, valid, what)


class HubFileNotFoundError(MitkError, FileNotFoundError):
    """Files of a Hugging Face Hub repo are not in the local cache and cannot be fetched.

    Offline, unreachable, or no such repo, revision or file; the message names the
    cache searched and says how to fetch the files.
    """


class InputFileError(MitkError, ValueError):
    """An input file (spec, prompt pairs, token ids, a config) is unreadable or malformed.

    Raised where the file is parsed, so the message names the file and, where the
    format has them, the line and the field or key path.
    """


class OutputPathError(MitkError, ValueError):
    """An output target cannot be written: its parent is a file or not writable, or it is a
    directory where a file belongs (or the reverse). Checked before any work starts."""


class OutputLockedError(MitkError, RuntimeError):
    """Another running process holds the lock on an output target; the message names it."""
