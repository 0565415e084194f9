"""Error type of the data pipeline.

Every failure a user can cause or fix (a missing registry client, a failed
download, an empty corpus path, a split too small for the sequence length)
is raised as :class:`DataError`, whose message says what failed and what to
do about it, so that the CLI can print it as one line instead of a traceback.
"""

from __future__ import annotations

from moekit.errors import MoekitError


class DataError(MoekitError):
    """A data-pipeline failure with a human-readable, actionable message.

    A :class:`~moekit.errors.MoekitError`, so the ``moekit`` CLI prints it as
    one line (``moekit data: error: ...``) instead of a traceback.
    """


__all__ = ["DataError"]
