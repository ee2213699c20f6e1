"""Prompt environment: dual-space patch graph, prompt initialisers, batched prompt environment."""
