"""gptqlab: GPTQ quantization workbench for Chinese large language models.

import gptqlab
model = gptqlab.load("out/tiny-zh-llama-4bit")          # transformers model on QuantLinear layers
tokenizer = gptqlab.load_tokenizer("out/tiny-zh-llama-4bit")
"""

__version__ = "0.1.0"


def load(name_or_path, device="auto", backend="auto", dtype=None, trust_remote_code=False, threads=None):
    """Load a GPTQ checkpoint (or an unquantized model) as a transformers model; see :func:`gptqlab.loader.load`.

    dtype None: float16 on CUDA; on the CPU bfloat16 for a quantized model on torch's int4 kernel (logits about
    0.5 % from the exact reference), float32 otherwise; pass ``dtype=torch.float32`` for float32 activations.
    threads: the CPU thread count to set; None applies :func:`gptqlab.loader.default_cpu_threads`.
    """
    from gptqlab.loader import load as _load

    return _load(
        name_or_path,
        device=device,
        backend=backend,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        threads=threads,
    )


def load_tokenizer(name_or_path, trust_remote_code=False):
    """The tokenizer of an embedded model, a local folder or a Hub id."""
    from gptqlab.loader import load_tokenizer as _load_tokenizer

    return _load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


__all__ = ["__version__", "load", "load_tokenizer"]
