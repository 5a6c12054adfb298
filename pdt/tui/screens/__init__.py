"""TUI screens, one per file: home (presets), run (a job's live view), runs (attach), editor, help."""
