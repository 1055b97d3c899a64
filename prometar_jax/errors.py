"""Failures a run expects and explains, as opposed to bugs.

launch.py prints these (and OSError, ValueError) as one short message
naming the cause and what to do, and exits non-zero; `--verbose` shows
the traceback. Anything else is a bug and keeps its traceback.
"""


class RunError(Exception):
  """An expected failure of a run; the message says what to do."""


class RunMismatch(RunError):
  """A workdir holds a run of another configuration, data or model."""


class WorkdirLocked(RunError):
  """Another process is writing to the workdir."""


class TrainingDiverged(RunError, FloatingPointError):
  """A loss or the state became non-finite or blew up; names the step."""
