"""Declarative tensor-name maps from Hugging Face / GGUF checkpoints to the zoo's models (JSON data)."""
