"""specforge bundled plugin: hf_backend."""
