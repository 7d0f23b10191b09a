"""The ``transcriptd`` console script, from a top-level module whose name no other distribution installs.

transcriptd's packages are named ``daemon`` and ``storage``, names other distributions install too
(python-daemon installs ``daemon``). In a shared environment the first one on ``sys.path`` wins, and
``transcriptd`` would fail with an ImportError from deep inside, or run someone else's code. So the command
checks first that both packages are ours (each carries ``__transcriptd__ = True``), and names the conflict in
one line if not.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

PACKAGES = ("daemon", "storage")
MARKER = "__transcriptd__"
EXIT_CONFLICT = 2  # like a bad setting: restarting cannot fix it (the systemd unit does not restart on 2)
REMEDY = "install transcriptd in an environment of its own: `pipx install <checkout or wheel>`, or a venv of its own"


def conflict() -> str | None:
    """Why transcriptd's own packages cannot be used in this environment; None when both are ours."""
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            return f"cannot import transcriptd's package {name!r} ({exc}); {REMEDY}"
        if getattr(module, MARKER, None) is not True:
            where = getattr(module, "__file__", None) or "a namespace package"
            return (
                f"the {name!r} package found first ({where}) is not transcriptd's: another distribution "
                f"(python-daemon, say) installs a top-level {name!r} too and shadows ours; {REMEDY}"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    if (problem := conflict()) is not None:
        print(f"transcriptd: {problem}", file=sys.stderr)
        return EXIT_CONFLICT
    from daemon.cli import main as run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
