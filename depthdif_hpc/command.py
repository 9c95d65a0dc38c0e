"""How the command lines report bad input: one line that names the culprit, exit status 2.

A missing file or a value the package refuses is the user's to fix, and a traceback only buries
the message; anything else is a bug and keeps its traceback. The prefix is the program name the
command's argparse uses (`python -m <module>`), so argparse's own usage errors and these read alike.
A ValueError can also come from a bug deep inside: DEPTHDIF_TRACEBACK=1 lets every error through
with its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

# ConfigError, SourceError and the refusals of the loaders are ValueErrors.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError,
)


def command(*also: type[BaseException]) -> Callable[[Callable[..., int | None]],
                                                     Callable[..., int]]:
    """Decorate a command's `main(argv)`: INPUT_ERRORS and `also` become
    "python -m <module>: error: <message>" on stderr and exit status 2; None returns 0."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: object, **kwargs: object) -> int:
            try:
                code = main(*args, **kwargs)
            except (*INPUT_ERRORS, *also) as exc:
                if os.environ.get("DEPTHDIF_TRACEBACK", "") not in ("", "0"):
                    raise
                print(f"{_prog(main)}: error: {exc}", file=sys.stderr, flush=True)
                return 2
            return 0 if code is None else code

        return run

    return wrap


def _prog(main: Callable[..., object]) -> str:
    # Under `python -m` the module is __main__; its spec keeps the name it was run by.
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    return f"python -m {spec.name if spec is not None else main.__module__}"
