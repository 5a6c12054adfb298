"""PDT Workbench: an interactive trainer for the Parallel Decoder Transformer.

This package root is deliberately light: importing `pdt` loads neither torch nor textual,
so the CLI can start, list presets and print errors instantly. Heavy modules are imported
by the jobs that need them.
"""

__version__ = "0.1.0"


def code_version() -> str:
    """The package version plus the git commit when running from a checkout (for manifests)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
