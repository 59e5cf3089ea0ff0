"""Generation engine: KV memory, sampling, scheduling (one thread owns the model)."""
