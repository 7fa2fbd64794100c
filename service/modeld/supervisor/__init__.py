"""Backend supervision: one owner task per model, and the registry that admits loads."""
