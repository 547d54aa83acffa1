"""specforge bundled plugin: llama_eagle3."""
