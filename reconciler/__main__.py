"""`python -m reconciler`."""

from .cli import main

main()
