"""Offline asset builders (tiny models, smoke and scene tasks) and the scene-model trainer; run as
``python -m scripts.<name>`` from the repository root."""
