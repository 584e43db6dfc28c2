"""The ``image_folder`` task: ``<data_dir>/train/<class>/*.png`` and ``<data_dir>/val/<class>/...``.

Imports: the standard library, :mod:`.spec` and :mod:`elalora.errors` only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from ..errors import TaskError
from .spec import TaskSpec

__all__ = ["IMAGE_EXTENSIONS"]

#: File extensions recognised as images by the ``image_folder`` task (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(spec: TaskSpec, data_dir: Path | None) -> tuple[list[dict], list[dict], TaskSpec]:
    """Image classification from ``<data_dir>/train/<class>/`` and ``<data_dir>/{val,validation,test}/<class>/``.

    Class names are the sorted names of the class folders under ``train/``; label ids index them.
    Images are found recursively inside each class folder and listed in sorted path order.
    """
    if data_dir is None:
        raise TaskError("task 'image_folder' needs --data-dir: a folder with train/<class>/ and val/<class>/")
    if not data_dir.is_dir():
        raise TaskError(f"image folder {str(data_dir)!r} does not exist")
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise TaskError(f"no train/ folder in {str(data_dir)!r}; expected <data_dir>/train/<class>/*.png")
    eval_dir = next((data_dir / n for n in ("val", "validation", "test") if (data_dir / n).is_dir()), None)
    if eval_dir is None:
        raise TaskError(f"no val/ (or validation/, test/) folder in {str(data_dir)!r}; "
                        "expected <data_dir>/val/<class>/*.png")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TaskError(f"{str(train_dir)!r} must contain at least two class folders; found {classes}")
    if spec.label_names:
        if sorted(spec.label_names) != classes and list(spec.label_names) != classes:
            raise TaskError(f"class folders {classes} in {str(train_dir)!r} do not match the task's "
                            f"label names {spec.label_names}")
        classes = list(spec.label_names)
    index = {c: i for i, c in enumerate(classes)}

    def collect(split_dir: Path) -> list[dict]:
        out = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in index:
                raise TaskError(f"class folder {str(class_dir)!r} has no counterpart in {str(train_dir)!r}; "
                                f"known classes: {', '.join(classes)}")
            out.extend({"image_path": str(p), "label": index[class_dir.name]} for p in _list_images(class_dir))
        if not out:
            raise TaskError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {str(split_dir)!r}")
        return out

    train, evals = collect(train_dir), collect(eval_dir)
    resolved = dataclasses.replace(spec, num_labels=len(classes), label_names=list(classes))
    return train, evals, resolved
