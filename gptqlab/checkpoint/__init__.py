"""GPTQ checkpoints (docs/FORMAT.md): the format, its config, writing and verification."""
