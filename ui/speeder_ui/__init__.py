"""Speeder's Gradio demo: inspect recommendations, edit a history, compare two checkpoints (`speeder ui`)."""
