"""Tasks: definitions, data loading, batch collation and metrics (used by the recipe, the CLI,
the benchmarks and the examples; any training loop can use them).

Supported tasks: GLUE (``cola sst2 mrpc qqp stsb mnli qnli rte wnli``; a local copy in the
``download_glue_data.py`` layout or the Hub dataset ``nyu-mll/glue``), ``custom`` (your CSV, TSV
or JSONL files; classification or regression inferred from the labels), ``e2e_nlg`` (data-to-text
for causal LMs, BLEU and ROUGE-L) and ``image_folder``.

Examples are plain dicts:

* text classification / regression: ``{"text_a": str, "text_b": str (pair tasks only), "label": int | float}``
* generation: ``{"prompt": str, "target": str, "references": list[str]}``
* image: ``{"image_path": str, "label": int}``

Every problem with the user's data or arguments raises :class:`~elalora.errors.TaskError` with
a one-line message. The metrics and image decoding need ``pip install 'elalora[tasks]'``.

Modules: :mod:`.spec` (task specs), :mod:`.sources` (loading, :class:`DataSpec`; :mod:`.e2e`, :mod:`.images`),
:mod:`.collate` (batches), :mod:`.metrics`. Imports: :mod:`elalora.errors`, :mod:`elalora._extras`
and third-party packages only -- nothing else of elalora.
"""

from __future__ import annotations

from ..errors import TaskError
from .collate import CausalLMCollator, ImageCollator, TextClassificationCollator, encode_prompts, eos_id
from .e2e import build_prompt
from .images import IMAGE_EXTENSIONS
from .metrics import compute_metrics
from .sources import GLUE_HUB_DATASET, DataSpec, glue_layout, load_task_data
from .spec import GLUE_TASKS, OTHER_TASKS, TaskSpec, get_task, known_task_names

__all__ = [
    "TaskError", "TaskSpec", "GLUE_TASKS", "OTHER_TASKS", "known_task_names", "get_task", "load_task_data",
    "DataSpec", "build_prompt", "TextClassificationCollator", "CausalLMCollator", "encode_prompts", "eos_id",
    "ImageCollator", "compute_metrics", "GLUE_HUB_DATASET", "IMAGE_EXTENSIONS", "glue_layout",
]
