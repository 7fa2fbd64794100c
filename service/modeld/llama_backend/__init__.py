"""The ``llama-cpp`` backend: GGUF models served by llama.cpp (through llama-cpp-python).

It speaks LocalAI's backend protocol like the reference backend and shares its plumbing
(:mod:`modeld.backend_kit`). llama-cpp-python is optional (``pip install
'modeld[llama-cpp]'``): without it the backend still starts and answers Health, and
LoadModel fails saying how to install it. Run it as
``python -m modeld.llama_backend --addr unix:/path.sock`` (what ``run.sh`` does).
"""
