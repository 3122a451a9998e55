"""``python -m lepton.cli``: the command line, as ``lepton`` runs it."""

from lepton.cli.app import main

if __name__ == "__main__":
    main()
