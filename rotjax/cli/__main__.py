import sys

from rotjax.cli import main

sys.exit(main())
