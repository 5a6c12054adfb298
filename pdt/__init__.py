"""PDT Workbench: an interactive trainer for the Parallel Decoder Transformer.

This package root is deliberately light: importing `pdt` loads neither torch nor textual,
so the CLI can start, list presets and print errors instantly. Heavy modules are imported
by the jobs that need them.
"""

__version__ = "0.1.0"


def code_version() -> str:
    """The package version plus the git commit when running from a checkout (for manifests), with
    `.dirty` when tracked files differ from that commit: the figures then came from other code.
    `PDT_CODE_VERSION` names the commit instead, for a copied tree whose own git is another commit
    (the device machine's copy of a checkout)."""
    import os
    import subprocess
    from pathlib import Path

    given = os.environ.get("PDT_CODE_VERSION", "").strip()
    if given:
        return f"{__version__}+{given}"

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            run = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return run.stdout.strip() if run.returncode == 0 else ""

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return __version__
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}"
