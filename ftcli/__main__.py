"""Entry point for `python -m ftcli`."""

from ftcli.cli.entry import main

main()
