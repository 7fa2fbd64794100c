"""modeldctl: the command-line client of modeld (``modeld.cli.main:main``)."""
