"""specforge bundled plugin: fsdp2."""
