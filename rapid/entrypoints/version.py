"""The installed package's version (`rapid --version`, GET /version)."""

from __future__ import annotations

import importlib.metadata


def version() -> str:
    try:
        return importlib.metadata.version("rapid")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        import rapid

        return getattr(rapid, "__version__", "unknown")
