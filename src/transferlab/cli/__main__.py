"""``python -m transferlab.cli``."""

from .main import main

raise SystemExit(main())
