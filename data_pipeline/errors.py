"""The two kinds of failure every layer of unimo raises: a user's mistake, and a fault that may pass.

They live here, at the bottom of the dependency order (the trainer and the orchestrator import the data
pipeline, never the reverse), so that the data pipeline's own errors can be one of the two. The orchestrator's
failure policy reads the kind: a ``UserError`` raised in a Ray Train worker ends the job at once (retrying a
missing path or a wrong vocabulary size cannot help), a ``TransientError`` is retried up to
``scaling.max_failures`` times.
"""

from __future__ import annotations


class UserError(RuntimeError):
    """A mistake in the run's input: a config value, a path, a permission, a shape that does not match.

    The message is one paragraph: what is wrong, where (the config key, file or URL) and what to do.
    ``detail`` may carry the full traceback text of where it was raised (written to the run's log, not shown).
    """

    detail: str = ""


class TransientError(RuntimeError):
    """A fault a later attempt may not meet: a network or storage outage, a lost node, a timeout."""
