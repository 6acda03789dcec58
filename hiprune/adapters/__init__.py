"""Model adapters: the plumbing between a model family and the methods. Importing registers them."""

from hiprune.adapters.base import Adapter, PruningError, PruningSession, adapter_for, apply
from hiprune.adapters.llava import LlavaAdapter

__all__ = ["Adapter", "LlavaAdapter", "PruningError", "PruningSession", "adapter_for", "apply"]
