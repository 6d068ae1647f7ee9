"""gptqlab: GPTQ quantization workbench for Chinese LLMs.

The repository keeps ``quant/``, ``kernels/``, ``calib/`` and ``benchmarks/`` at its top, but they are
installed only as sub-packages of ``gptqlab`` (``gptqlab.quant`` ...). Top-level modules named ``quant``,
``kernels`` or ``calib`` would clash with PyPI packages, and transformers probes for ``kernels``.
"""

from setuptools import setup

PACKAGE_DIR = {
    "gptqlab": "gptqlab",
    "gptqlab.quant": "quant",
    "gptqlab.kernels": "kernels",
    "gptqlab.calib": "calib",
    "gptqlab.benchmarks": "benchmarks",
}

setup(
    name="gptqlab",
    version="0.1.0",
    description="GPTQ quantization workbench for Chinese large language models",
    python_requires=">=3.10",
    packages=[*PACKAGE_DIR, "gptqlab.checkpoint", "gptqlab.cli", "gptqlab.quantize", "gptqlab.quantize.distributed"],
    package_dir=PACKAGE_DIR,
    package_data={"gptqlab": ["models/*/*", "models/*.md"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm",
        "typer>=0.12",
        "snownlp",
        "tokenizers",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "datasets": ["datasets"],
        "plot": ["matplotlib"],
        "test": [
            "pytest",
            "ruff",
            "hypothesis",
            "triton>=3.0",
            "datasets",
            "matplotlib",
            "optimum",
            "gptqmodel==7.6.0",
        ],
    },
    entry_points={"console_scripts": ["gptqlab=gptqlab.cli:main"]},
)
