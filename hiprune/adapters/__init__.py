"""Model adapters: one file per model family, registered with ``@register_adapter``.

Every module of this package is imported here, so a new family is one new adapter file.
"""

import importlib
import pkgutil

from hiprune.adapters.base import Adapter, PruningError, PruningSession, adapter_for, apply

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from hiprune.adapters.llava import LlavaAdapter  # noqa: E402  (re-exported; registered by the loop above)

__all__ = ["Adapter", "LlavaAdapter", "PruningError", "PruningSession", "adapter_for", "apply"]
