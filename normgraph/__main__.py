"""`python -m normgraph ...` runs the command line (see normgraph/cli.py)."""
from .cli import main

raise SystemExit(main())
