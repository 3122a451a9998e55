"""``python -m lepton``: the command line (torchrun starts training workers this way: ``torchrun -m lepton``)."""

from lepton.cli import main

if __name__ == "__main__":
    main()
