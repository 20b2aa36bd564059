"""`python -m normgraph.demo` runs the demo (the same as `normgraph demo`)."""
from .run import main

raise SystemExit(main())
