"""Charts: the one place that sets matplotlib up (Agg, its cache inside the output folder) and saves a PNG."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from p2p_local.files import atomic_write_with, disk_error


@contextlib.contextmanager
def pyplot(out: Path) -> Iterator[Any]:
    """`matplotlib.pyplot` on the Agg backend, with MPLCONFIGDIR in a temporary folder inside `out` (made if
    missing, removed afterwards; the previous value restored)."""
    # matplotlib otherwise writes its config and font cache under $HOME, outside the data dir and --out;
    # it reads the variable at its first import, so it is set before that.
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix=".matplotlib-", dir=out)
    except OSError as e:  # `out` is a file, or read-only
        raise disk_error(e, out) from None
    try:
        with mock.patch.dict(os.environ, MPLCONFIGDIR=tmp.name):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            yield plt
    finally:
        tmp.cleanup()


def save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay `fig` out, write it to `path` as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), mode=0o644)
    plt.close(fig)
    return path
