"""Process-global state through which one test can silence or misroute the warnings of a later test.

Why (issue 22): in one long run, transformers' `test_bc_cache_name_forward` recorded no `past_key_values`
deprecation warning, while it passes alone; the leak was not reproduced. Two ways for it exist in this environment,
and tests/test_leaked_state.py shows each one hiding exactly that warning:

- a `warnings.catch_warnings` left open, e.g. by a generator suspended inside its `with` block. When the garbage
  collector closes that generator later, inside another test's `catch_warnings(record=True)`, its `__exit__` puts
  back the filters and the `showwarning` of its own time, and the warning goes to a list nobody reads;
- torch's compile flags: `torch.compiler.is_compiling()` reads one flag for the whole process, and transformers'
  `deprecate_kwarg` never warns while it is set.

tests/conftest.py checks every test at its teardown against its own start, so the test that leaves either behind
fails by name, instead of a later, unrelated test failing by chance. (A warning filter added without
`catch_warnings` is not a leak: pytest puts the filters back after each test.)
"""

from __future__ import annotations

import threading
import warnings

import torch


def snapshot() -> dict:
    """What a later test's warnings depend on: the filter list and the functions that receive shown warnings (all
    replaced by `catch_warnings.__enter__` and put back by its `__exit__`; torch's `hide_warnings` replaces
    `showwarning` too), and torch's compile flags."""
    return {"filters": warnings.filters, "receiver": warnings._showwarnmsg_impl, "showwarning": warnings.showwarning,
            "compiling": torch.compiler.is_compiling(), "exporting": torch.compiler.is_exporting()}


def describe() -> str:
    """The state a warning depends on right now, and the other threads (which share it), for a failure report: if a
    test that records warnings ever fails by chance again, its report says which piece was off."""
    threads = [f"{t.name}{' (daemon)' if t.daemon else ''}" for t in threading.enumerate()
               if t is not threading.current_thread()]
    return "\n".join([
        f"warnings.showwarning: {warnings.showwarning!r}",
        f"warnings._showwarnmsg_impl: {warnings._showwarnmsg_impl!r}",
        f"first warning filters: {warnings.filters[:4]!r}",
        f"torch.compiler.is_compiling(): {torch.compiler.is_compiling()}, "
        f"is_exporting(): {torch.compiler.is_exporting()}",
        f"other threads: {', '.join(threads) or 'none'}",
    ])


def leaks_since(before: dict) -> list[str]:
    """One line per piece of `snapshot()` that is not as it was at `before`, saying what a later test would see."""
    now = snapshot()
    found = []
    if any(now[k] is not before[k] for k in ("filters", "receiver", "showwarning")):
        found.append("the warning filters or the function receiving shown warnings were replaced and not put back: "
                     "a warnings.catch_warnings() entered here is still open (e.g. held by a suspended generator; "
                     "whenever it is closed, inside a later test, that test's recorded warnings go astray), or one "
                     "left open earlier was closed here; end it where it began (a `with` block, or close the "
                     "generator)")
    for flag in ("compiling", "exporting"):
        if now[flag] != before[flag]:
            found.append(f"torch.compiler.is_{flag}() went from {before[flag]} to {now[flag]} (one flag for the "
                         "whole process: while it is True, transformers' deprecate_kwarg stays silent)")
    return found
