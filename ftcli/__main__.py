"""Entry point for `python -m ftcli`."""

from ftcli.entry import main

main()
