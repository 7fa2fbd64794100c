"""The ``reference`` backend: a small, real model server speaking the LocalAI backend protocol.

It trains a word-level trigram model on a UTF-8 text file at ``LoadModel`` and serves
``Predict``, ``PredictStream``, ``Embedding``, ``TokenizeString``, ``Status``, ``Free`` and
``Health`` over gRPC. ``ModelOptions.Options`` test knobs (see :mod:`.knobs`) make it slow,
hungry, failing, crashing or hung on demand. Run it as
``python -m modeld.reference_backend --addr unix:/path.sock`` (what ``run.sh`` does).
"""
