"""Speeder: one token per item for LLM-based multimodal sequential recommendation (plain PyTorch)."""

__version__ = "0.1.0"
