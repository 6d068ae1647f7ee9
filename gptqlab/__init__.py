"""gptqlab: GPTQ quantization workbench for Chinese large language models."""

__version__ = "0.1.0"
