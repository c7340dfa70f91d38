"""`python cli.py ...` from a source checkout; installed, the same commands are `mimic ...`.
The commands live in mimic_toolkit/cli.py."""
from mimic_toolkit.cli import main

if __name__ == "__main__":
    main()
