"""A job kind whose module cannot be imported: it needs a library that is not installed."""

import interplab_frobnicator  # noqa: F401 - does not exist: importing this module raises ModuleNotFoundError
