"""A model folder's JSON files read with one-line errors that name the file, the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path


class ModelFolderError(ValueError):
    """A model folder's file with a missing or wrong key; the message names the file, the key and the fix."""


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; a one-line :class:`ModelFolderError` (ending in ``fix``) if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path} is not a text file ({e.reason}); {fix}") from e
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(data).__name__}, not an object of keys; {fix}")
    return data
