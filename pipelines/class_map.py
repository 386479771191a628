"""The class-to-index mapping saved with a run and checked on resume and evaluation.

A model's output ``k`` means class ``class_names[k]``; if a later run lists its folders differently (a class
added, renamed, or removed), silently reusing the indices would train or evaluate against wrong labels. The
run directory keeps ``classes.json`` and every later use compares against it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastsupmae.errors import DataError

CLASS_MAP_FILE = "classes.json"


def class_folder_name(name: str) -> str:
    """The folder name of class ``name`` in an image-folder layout: path separators become '_' (Fashion-MNIST's
    'T-shirt/top' -> 'T-shirt_top'); every other name is its own folder name."""
    return name.replace("/", "_").replace("\\", "_")


def _file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / CLASS_MAP_FILE if p.is_dir() or p.suffix != ".json" else p


def save_class_map(path: str | os.PathLike, class_names: list[str]) -> Path:
    """Write ``{"classes": [...], "class_to_idx": {...}}`` to ``path`` (a run directory or a .json file).

    Written to a temporary name and renamed, so an interrupted write never leaves a broken file.

    Returns:
        the file written.
    """
    f = _file(path)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps({"classes": list(class_names),
                               "class_to_idx": {c: i for i, c in enumerate(class_names)}}, indent=1))
    os.replace(tmp, f)
    return f


def load_class_map(path: str | os.PathLike) -> list[str]:
    """The class names saved by :func:`save_class_map`."""
    f = _file(path)
    try:
        return list(json.loads(f.read_text())["classes"])
    except FileNotFoundError:
        raise DataError(f"class map '{f}' does not exist") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"class map '{f}' is not a valid class map ({e}); delete it to start afresh") from None


def describe_difference(saved: list[str], now: list[str]) -> str:
    """How class list ``now`` differs from ``saved`` (classes added / missing, or the first index that moved)."""
    added = sorted(set(now) - set(saved))
    removed = sorted(set(saved) - set(now))
    if added or removed:
        return f"added {added[:5]}, missing {removed[:5]}"
    k = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
    if k >= min(len(saved), len(now)):
        return f"{len(saved)} saved, {len(now)} now"
    return f"same classes in another order (index {k}: saved '{saved[k]}', now '{now[k]}')"


def check_class_map(path: str | os.PathLike, class_names: list[str], missing_ok: bool = True) -> None:
    """Compare ``class_names`` with the saved map.

    Args:
        path: run directory or .json file.
        class_names: what the data gives now.
        missing_ok: True: no saved map is fine (a run from before maps were saved); False: raise.

    Raises:
        DataError: the data's classes differ from the saved ones (says how), or the map is missing.
    """
    f = _file(path)
    if not f.exists():
        if missing_ok:
            return
        raise DataError(f"class map '{f}' does not exist; the checkpoint's run directory should hold it")
    saved = load_class_map(f)
    if saved == list(class_names):
        return
    how = describe_difference(saved, list(class_names))
    raise DataError(f"the data's classes differ from the run's class map '{f}' ({len(saved)} saved, "
                    f"{len(class_names)} now; {how}); point data.root at the data the run was trained on")
