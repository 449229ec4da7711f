"""``python -m rotjax``: the ``rotjax`` command line (as ``python -m rotjax.cli``)."""

from rotjax._launch import entry

entry()
