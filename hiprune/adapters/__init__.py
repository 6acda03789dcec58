"""Model adapters: the plumbing between a model family and the methods. Importing registers them."""

from hiprune.adapters.base import Adapter, PruningError, PruningSession, adapter_for, apply
from hiprune.adapters.llava import LlavaAdapter
from hiprune.adapters.qwen2_5_vl import Qwen25VLAdapter  # noqa: F401  (registers the Qwen2.5-VL adapter)
from hiprune.adapters.llava_next import LlavaNextAdapter  # noqa: F401  (registers LLaVA-NeXT)
from hiprune.adapters.video_llava import VideoLlavaAdapter  # noqa: F401  (registers Video-LLaVA)

__all__ = ["Adapter", "LlavaAdapter", "PruningError", "PruningSession", "adapter_for", "apply"]
