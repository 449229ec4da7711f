"""``python -m rotjax``: the ``rotjax`` command line (as ``python -m rotjax.cli``)."""

from rotjax._launch import entry

if __name__ == "__main__":  # (importing it, as doc tools do, ran the command)
    entry()
