"""Scripts for a GPU machine (torch + transformers, no vLLM needed)."""
