"""``python -m modeld.llama_backend --addr ADDR``: run the llama-cpp backend."""

from modeld.llama_backend.server import main

raise SystemExit(main())
