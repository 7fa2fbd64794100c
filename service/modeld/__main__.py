"""`python -m modeld` runs the daemon."""

from modeld.daemon import main

raise SystemExit(main())
