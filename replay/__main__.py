"""``python -m replay``: the same as the ``replay`` console script."""
from .cli import main

raise SystemExit(main())
