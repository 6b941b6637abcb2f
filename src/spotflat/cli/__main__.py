"""``python -m spotflat.cli``: the same as the ``spotflat`` command."""

from . import console_main

console_main()
