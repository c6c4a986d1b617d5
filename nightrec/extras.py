"""Optional dependencies: each lives in a pyproject extra and is imported only by the feature that needs it.

``nightrec[ray]`` (ray, prefect-ray): ``task_runner = "ray"``, the sharded stages on a Ray cluster.
``nightrec[peers]`` (implicit): the ALS peer of ``nightrec evaluate``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"ray": ("ray", "prefect-ray"), "peers": ("implicit",)}


class MissingExtraError(ImportError):
    """A feature was asked for whose optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        packages = ", ".join(EXTRAS[extra])
        raise MissingExtraError(
            f"{feature} needs {packages}, which is not installed: pip install 'nightrec[{extra}]' "
            f"(missing module: {exc.name or module})"
        ) from exc
