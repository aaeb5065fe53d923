"""Entry point for `python -m ftcli`."""

from ftcli.cli import main

main()
