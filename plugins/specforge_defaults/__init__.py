"""specforge bundled plugin: defaults."""
