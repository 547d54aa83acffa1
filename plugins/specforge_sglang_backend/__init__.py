"""specforge bundled plugin: sglang_backend."""
