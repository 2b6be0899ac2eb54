"""tunelab: a self-hosted workbench for fine-tuning open LLMs (data, training, evaluation, serving)."""

__version__ = "0.1.0"
