"""``python -m modeld.reference_backend --addr ADDR``: run the reference backend."""

from modeld.reference_backend.server import main

raise SystemExit(main())
