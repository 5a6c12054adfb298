"""`pdt.code_version`: the commit of the checkout the code runs from, marked when it was edited."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pdt


def _load_from(root: Path):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("pdt_copy", root / "pdt" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(root: Path, *args: str) -> str:
    env = os.environ | {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, env=env
    ).stdout


def test_the_commit_and_whether_tracked_files_were_edited(tmp_path: Path) -> None:
    (tmp_path / "pdt").mkdir()
    shutil.copy(Path(pdt.__file__), tmp_path / "pdt" / "__init__.py")
    copy = _load_from(tmp_path)
    assert copy.code_version() == pdt.__version__  # not a checkout: the version alone
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "pdt")
    _git(tmp_path, "commit", "-qm", "first")
    sha = _git(tmp_path, "rev-parse", "--short", "HEAD").strip()
    assert copy.code_version() == f"{pdt.__version__}+{sha}"
    (tmp_path / "notes.txt").write_text("untracked")  # an untracked file is not an edit
    assert copy.code_version() == f"{pdt.__version__}+{sha}"
    (tmp_path / "pdt" / "__init__.py").write_text(
        (tmp_path / "pdt" / "__init__.py").read_text() + "\n# edit\n"
    )
    assert copy.code_version() == f"{pdt.__version__}+{sha}.dirty"


def test_a_copied_tree_names_its_commit_through_the_environment(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pdt").mkdir()
    shutil.copy(Path(pdt.__file__), tmp_path / "pdt" / "__init__.py")
    copy = _load_from(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "pdt")
    _git(tmp_path, "commit", "-qm", "first")
    monkeypatch.setenv("PDT_CODE_VERSION", "be3d831")
    assert copy.code_version() == f"{pdt.__version__}+be3d831"  # not the copy's own commit
    monkeypatch.setenv("PDT_CODE_VERSION", " ")
    sha = _git(tmp_path, "rev-parse", "--short", "HEAD").strip()
    assert copy.code_version() == f"{pdt.__version__}+{sha}"  # blank: the checkout's commit
