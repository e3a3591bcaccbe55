"""`python -m diffplugin_cli` (also what `accelerate launch -m diffplugin_cli` runs)."""

from .cli import main

main()
