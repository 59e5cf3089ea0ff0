"""Model definitions (official ChatGLM state-dict names)."""
