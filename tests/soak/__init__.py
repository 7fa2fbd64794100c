"""The chaos soak (issue 8): tests/integration/test_chaos_soak.py runs it."""
