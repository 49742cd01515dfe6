"""What a published LOUPE repository may contain, as allow-lists, and the uploads that use them.

A training output folder holds more than a model: optimizer state, `training_args.bin` (which
carries `--hub_token` in plain text), logs, and whatever else a user keeps there. Publishing
therefore never uploads a folder as it is: only the files named here go up, from the folder's
top level (or, for a Space, the app's own files).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Everything `save_pretrained` of a model and its processor writes, the rendered card, metrics, and
# the learning curves.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "README.md",
    "metrics.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "learning_curves.png",
    "training_facts.json",  # what the card's training section says (steps, batch, time, hardware)
)
# The package's own top-level modules: `trust_remote_code` checkpoints carry copies of some of them.
CODE_FILES = tuple(
    sorted(path.name for path in Path(__file__).parent.glob("*.py") if path.name != "__init__.py")
)
# What resuming from a pushed checkpoint folder needs; never `training_args.bin`.
RESUME_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "data_position_*.json",
    "trainer_state.json",
)
# The Space: its app, its own module, its requirements and card, the example pictures, and this
# package's source (loupe-hf is not on PyPI: the app imports the copy that sits beside it).
SPACE_FILES = (
    "app.py",
    "loupe_space.py",
    "requirements.txt",
    "README.md",
    "examples/*.png",
    "examples/*.jpg",
    "loupe_hf/*.py",
    "loupe_hf/*/*.py",
)
PACKAGE_DIR = Path(__file__).parent
# Only a folder's top level is published as a model (no nested `checkpoint-*` or user folders).
NESTED = ("*/*",)


def upload_model_folder(
    api: Any,
    repo_id: str,
    folder: str | Path,
    *,
    with_resume_state: bool = False,
    path_in_repo: str | None = None,
    **upload: Any,
) -> Any:
    """Uploads the allow-listed files of `folder` (top level only) to the model repo `repo_id`
    with `api.upload_folder`; `with_resume_state` adds what resuming needs (not the training
    arguments). Other keywords (`commit_message`, `token`, `revision`, `run_as_future`) go on."""
    allowed = [*MODEL_FILES, *CODE_FILES, *(RESUME_FILES if with_resume_state else ())]
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        allow_patterns=allowed,
        ignore_patterns=list(NESTED),
        **upload,
    )


def model_files(folder: str | Path) -> list[Path]:
    """The allow-listed model files (and remote-code files) at the top level of `folder`."""
    patterns = (*MODEL_FILES, *CODE_FILES)
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)
    )


def export_model_folder(training_dir: str | Path, target: str | Path) -> Path:
    """Copies the final model of a training output folder (its allow-listed top-level files: weights,
    config, processor, card, metrics; no `checkpoint-*`, optimizer state or training arguments) to
    `target`, replacing it as a whole: the files go to a temporary folder beside it first, so a
    reader never sees a half-copied model."""
    target = Path(target)
    files = model_files(training_dir)
    if not any(path.name == "config.json" for path in files):
        raise FileNotFoundError(f"{training_dir} holds no config.json: it is not a saved model")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in files:
            shutil.copy2(path, staging / path.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def upload_space_folder(api: Any, repo_id: str, folder: str | Path, **upload: Any) -> Any:
    """Uploads the Space's allow-listed files of `folder`, together with this package's source as
    `loupe_hf/`, to the Space `repo_id` (one commit)."""
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        shutil.copytree(
            PACKAGE_DIR,
            Path(staging) / "loupe_hf",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="space",
            folder_path=staging,
            allow_patterns=list(SPACE_FILES),
            **upload,
        )


__all__ = [
    "CODE_FILES",
    "MODEL_FILES",
    "RESUME_FILES",
    "SPACE_FILES",
    "export_model_folder",
    "model_files",
    "upload_model_folder",
    "upload_space_folder",
]
