from rotjax.cli import entry

entry()
