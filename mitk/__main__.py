"""``python -m mitk`` runs the command line."""

from mitk.cli import main

main()
