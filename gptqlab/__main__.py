"""``python -m gptqlab``: the command line (also what ``torchrun ... -m gptqlab quantize`` runs)."""

from gptqlab.cli import main

main()
