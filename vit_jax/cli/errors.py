"""One message, not a traceback, for an input error on any command.

A command calls `report(error)` for the errors that mean "the input is wrong" (a bad
flag, a missing file, a damaged checkpoint, ...): it prints `Error: <message>` on stderr.
For bug reports the traceback is printed too when the environment sets
VIT_JAX_TRACEBACK=1 or the command runs with --verbosity=1 (or higher).
"""

import os
import sys
import traceback

TRACEBACK_ENV = "VIT_JAX_TRACEBACK"

# Errors that come from the input rather than from a bug: ValueError covers the config,
# data and checkpoint errors (ConfigError, DataError subclasses, CheckpointError), OSError
# the files (missing, a directory expected, permissions).
INPUT_ERRORS = (ValueError, OSError)


def _verbosity_from_argv(argv) -> int:
  value = 0
  for i, arg in enumerate(argv):
    for flag in ("--verbosity=", "-v="):
      if arg.startswith(flag):
        value = _int(arg[len(flag):])
    if arg in ("--verbosity", "-v") and i + 1 < len(argv):
      value = _int(argv[i + 1])
  return value


def _int(text) -> int:
  try:
    return int(text)
  except ValueError:
    return 0


def wants_traceback(argv=None) -> bool:
  """VIT_JAX_TRACEBACK set (not '' or '0'), or --verbosity >= 1 on the command line."""
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  return _verbosity_from_argv(sys.argv[1:] if argv is None else argv) >= 1


def report(error: BaseException, argv=None, stream=None) -> None:
  """Prints 'Error: <message>' (and the traceback when asked for) on stderr."""
  stream = stream or sys.stderr
  if wants_traceback(argv):
    traceback.print_exception(type(error), error, error.__traceback__, file=stream)
  message = str(error) or type(error).__name__
  if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
    message = f"{message}: {error.filename}"
  print(f"Error: {message}", file=stream, flush=True)
  if not wants_traceback(argv):
    print(f"(Set {TRACEBACK_ENV}=1 or pass --verbosity=1 for the traceback.)", file=stream,
          flush=True)
