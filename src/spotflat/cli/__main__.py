"""``python -m spotflat.cli``: the same as the ``spotflat`` command."""

from . import main

main(prog_name="spotflat")
