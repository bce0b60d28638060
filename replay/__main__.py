"""``python -m replay``: the same as the ``replay`` console script."""
from replay.cli.main import main

raise SystemExit(main())
