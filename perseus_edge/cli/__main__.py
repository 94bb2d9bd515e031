"""`python -m perseus_edge.cli`: the same as the `perseus` command (used by torchrun for DDP)."""

from perseus_edge.cli import main

main()
