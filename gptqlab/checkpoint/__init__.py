"""GPTQ checkpoints (docs/FORMAT.md).

format: QuantResult ⇄ file tensors, and the config dict written | config: reading the config every writer
writes | validate: the one check of a quantized Linear's tensors | verify: ``gptqlab verify`` and the checks
of every load | write: writing a folder atomically, with SHA256SUMS | engines: which serving engines can
serve a checkpoint, and on how many GPUs.
"""
