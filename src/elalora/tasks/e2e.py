"""The E2E NLG data-to-text task: ``meaning representation||reference`` files and the prompt format.

Imports: the standard library and :mod:`elalora.errors` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import logging
from typing import Any


from ..errors import TaskError

__all__ = ["build_prompt"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# E2E NLG
# ---------------------------------------------------------------------------------------------


def _e2e_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise TaskError("task 'e2e_nlg' needs --data-dir: a folder with e2e_nlg/valid.txt and e2e_nlg/test.txt")
    for cand in (data_dir / "e2e_nlg", data_dir / "e2e", data_dir):
        if (cand / "valid.txt").is_file() or (cand / "test.txt").is_file():
            return cand
    raise TaskError(f"no E2E files in {str(data_dir)!r}; expected "
                    f"{str(data_dir / 'e2e_nlg' / 'valid.txt')!r} and test.txt ('MR||reference' lines)")


def _read_e2e_pairs(path: Path) -> list[tuple[str, str]]:
    """Read ``meaning representation||reference`` lines; malformed lines are skipped with a warning."""
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} not found")
    pairs, bad = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            mr, sep, ref = line.partition("||")
            mr, ref = mr.strip(), ref.strip()
            if not sep or not mr or not ref:
                bad.append(lineno)
                continue
            pairs.append((mr, ref))
    if bad:
        logger.warning("%s: skipped %d line(s) without 'MR||reference', first at line %d", path, len(bad), bad[0])
    if not pairs:
        raise TaskError(f"no 'meaning representation||reference' lines in {str(path)!r}")
    return pairs


def _group_by_mr(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for mr, ref in pairs:
        groups.setdefault(mr, []).append(ref)
    return groups


def load_e2e(data_dir: Path | None, train_path: Path | None, eval_path: Path | None
              ) -> tuple[list[dict], list[dict]]:
    """E2E NLG: train on one example per line of ``valid.txt``; evaluate on ``test.txt`` grouped by MR.

    The public training file is not part of the shared data, so by default the model trains on the
    official dev set (``valid.txt``) and is evaluated on the test set. ``train_file``/``eval_file``
    (e.g. the official ``train.txt``) replace these defaults.
    """
    if train_path is None or eval_path is None:
        folder = _e2e_dir(data_dir)
        train_path = train_path or folder / "valid.txt"
        eval_path = eval_path or folder / "test.txt"
    train_pairs = _read_e2e_pairs(train_path)
    train_refs = _group_by_mr(train_pairs)
    train = [{"prompt": mr, "target": ref, "references": list(train_refs[mr])} for mr, ref in train_pairs]
    evals = [{"prompt": mr, "target": refs[0], "references": refs}
             for mr, refs in _group_by_mr(_read_e2e_pairs(eval_path)).items()]
    return train, evals


def build_prompt(example: Mapping[str, Any] | str) -> str:
    """Prompt text for a generation example: ``"<meaning representation>\\nDescription:"``.

    ``example`` is a generation example (its ``"prompt"`` holds the meaning representation) or the
    meaning representation itself. The model is trained to continue the prompt with
    ``" " + target + EOS`` (see :class:`CausalLMCollator`), so at generation time the text produced
    after the prompt, up to EOS, is the description.
    """
    mr = example if isinstance(example, str) else example["prompt"]
    return f"{str(mr).strip()}\nDescription:"
