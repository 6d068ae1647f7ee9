"""``python -m gptqlab.cli``: the same command line as ``python -m gptqlab``."""

from gptqlab.cli import main

main()
