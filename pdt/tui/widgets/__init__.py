"""TUI widgets, one per file; each owns its DEFAULT_CSS and knows nothing about event sources."""
