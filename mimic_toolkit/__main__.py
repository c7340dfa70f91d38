"""`python -m mimic_toolkit ...` (what `accelerate launch -m mimic_toolkit ...` runs)."""
from .cli import main

main()
