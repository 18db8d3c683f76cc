"""The one type of a user's mistake.

A `UserError` is something the person running a command can fix: a flag's
value, a folder or file they named, a damaged file of their run, a full disk.
Its message is one sentence: what is wrong, where, and the fix. `main.py`
prints it alone (`SIMPSONS_JAX_TRACEBACK=1` adds the traceback); every other
exception is a bug and keeps its traceback.

It is a `ValueError`, so that callers of the library who catch bad values
catch these too; `main.py` catches `UserError` only, never a bare ValueError
(which JAX or NumPy may raise for a bug).
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake the user can fix; the message says what, where and how."""
