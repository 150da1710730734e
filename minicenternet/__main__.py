"""``python -m minicenternet ...`` (and ``torchrun -m minicenternet ...``): the command line of :mod:`minicenternet.cli`."""

from .cli import main

main()
