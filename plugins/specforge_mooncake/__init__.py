"""specforge bundled plugin: mooncake."""
