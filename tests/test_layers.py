"""The adapter layer: maths, masks, merge, dtypes; pinned against PEFT where PEFT has the same form."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from elalora.layers import GatedLoRAAdapter, SVDAdapter

from conftest import tiny_bert
from tolerances import RTOL, assert_close


def _svd(base, r=3, cap=6, alpha=6.0, seed=0):
    a = SVDAdapter(base, r=r, capacity=cap, lora_alpha=alpha, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a.lora_lambda[:r] = torch.randn(r)
    return a


def test_init_is_identity_and_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    x = torch.randn(4, 7)
    y0 = base(x)
    a = SVDAdapter(base, r=3, capacity=6, lora_alpha=6.0)
    assert torch.equal(a(x), y0)  # λ = 0 at init: outputs unchanged
    with torch.no_grad():
        a.lora_lambda.normal_()
    m = a.active.float()
    expect = y0 + x @ (a.lora_Q * (a.lora_lambda * m)[:, None]).t() @ a.lora_P.t() * (6.0 / 3)
    assert_close(a(x), expect)
    # slots beyond r are inactive and zero
    assert a.rank == 3 and a.capacity == 6
    assert torch.all(a.lora_Q[3:] == 0) and torch.all(a.lora_P[:, 3:] == 0)


def test_conv1d_matches_linear():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    conv = Conv1D(5, 7)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    a, b = _svd(lin), _svd(conv)
    with torch.no_grad():
        for n in ("lora_P", "lora_Q", "lora_lambda"):
            getattr(b, n).copy_(getattr(a, n))
    x = torch.randn(2, 3, 7)
    assert_close(a(x), b(x))
    assert b.fan_in_fan_out and not a.fan_in_fan_out


def test_inactive_slots_get_zero_grad_and_no_output():
    torch.manual_seed(0)
    a = _svd(nn.Linear(7, 5))
    with torch.no_grad():  # junk in an inactive slot must not leak into the output
        a.lora_Q[4].normal_()
        a.lora_P[:, 4].normal_()
        a.lora_lambda[4] = 3.0
    x = torch.randn(4, 7)
    y = a(x)
    with torch.no_grad():
        a.lora_Q[4] = 0
        a.lora_P[:, 4] = 0
        a.lora_lambda[4] = 0
    assert_close(y, a(x))
    with torch.no_grad():
        a.lora_Q[4].normal_()
        a.lora_P[:, 4].normal_()
        a.lora_lambda[4] = 3.0
    a(x).pow(2).sum().backward()
    for name, p, dim in a.slot_parameters():
        g = p.grad.index_select(dim, torch.tensor([3, 4, 5]))
        assert torch.count_nonzero(g) == 0, name
        assert torch.count_nonzero(p.grad.index_select(dim, torch.tensor([0, 1, 2]))) > 0, name


def test_deactivate_reactivate_keeps_shapes_identities_and_optimizer_params():
    model = tiny_bert()
    import elalora

    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, form="svd", b=1, total_steps=10, tinit=1, tfinal=1,
                                                       delta_t=1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = [(id(p), tuple(p.shape)) for p in model.parameters()]
    group_ids = [id(p) for p in opt.param_groups[0]["params"]]
    a = h.adapters[0]
    a.deactivate([1])
    assert a.rank == 1
    a.activate([1], generator=torch.Generator().manual_seed(0))
    assert a.rank == 2
    assert [(id(p), tuple(p.shape)) for p in model.parameters()] == before
    assert [id(p) for p in opt.param_groups[0]["params"]] == group_ids
    with pytest.raises(ValueError, match="already active"):
        a.activate([1])


def test_new_rank_orthogonal_and_delta_unchanged():
    torch.manual_seed(0)
    a = _svd(nn.Linear(16, 12), r=4, cap=8)
    with torch.no_grad():  # make the active rows far from orthonormal
        a.lora_Q[:4] = torch.randn(4, 16) * torch.tensor([1.0, 5.0, 0.1, 2.0])[:, None]
        a.lora_Q[1] += a.lora_Q[0]
    d0 = a.delta_weight()
    a.activate([5, 6], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.delta_weight(), d0)  # λ_new = 0: an expansion is exactly function-preserving
    act = a.active_indices()
    q_act = a.lora_Q[act[:4]]
    for s in (5, 6):
        assert abs(a.lora_Q[s].norm().item() - 1) < RTOL[torch.float32]  # a float32 norm of a unit vector
        assert abs(a.lora_P[:, s].norm().item() - 1) < RTOL[torch.float32]
        assert (q_act @ a.lora_Q[s]).abs().max() < RTOL[torch.float32] * q_act.norm()
        assert (a.lora_P[:, act[:4]].t() @ a.lora_P[:, s]).abs().max() < RTOL[torch.float32] * a.lora_P.norm()
    assert abs(float(a.lora_Q[5].detach() @ a.lora_Q[6].detach())) < RTOL[torch.float32]  # new ranks orthogonal too
    # the new rank learns at once: dL/dλ_new != 0
    a(torch.randn(3, 16)).sum().backward()
    assert a.lora_lambda.grad[5] != 0


def test_new_ranks_equal_sequential_gram_schmidt_reference():
    """All new ranks of a matrix are orthonormalised in one batch; they must equal the one-at-a-time
    construction (each draw projected on span(active rows, earlier new rows), in float64 via QR)."""
    torch.manual_seed(1)
    a = _svd(nn.Linear(20, 14), r=3, cap=8)
    with torch.no_grad():
        a.lora_Q[:3] = torch.randn(3, 20) * torch.tensor([3.0, 0.2, 1.0])[:, None]
        a.lora_P[:, :3] = torch.randn(14, 3)
    basis_q, basis_p = a.lora_Q[:3].detach().double(), a.lora_P[:, :3].detach().t().double()
    g = torch.Generator().manual_seed(7)
    draws = [(torch.randn(20, generator=g), torch.randn(14, generator=g)) for _ in range(3)]  # q, p per slot

    def one_at_a_time(basis, v):
        u, _ = torch.linalg.qr(basis.t())
        w = v.double()
        for _ in range(2):
            w = w - u @ (u.t() @ w)
        return w / w.norm()

    ref_q, ref_p = [], []
    for vq, vp in draws:
        ref_q.append(one_at_a_time(torch.cat([basis_q] + [r[None] for r in ref_q]), vq))
        ref_p.append(one_at_a_time(torch.cat([basis_p] + [r[None] for r in ref_p]), vp))
    a.activate([3, 4, 5], generator=torch.Generator().manual_seed(7))
    assert_close(a.lora_Q[3:6], torch.stack(ref_q), dtype=torch.float32)  # float32 rows vs a float64 reference
    assert_close(a.lora_P[:, 3:6], torch.stack(ref_p, 1), dtype=torch.float32)
    assert torch.equal(a.lora_lambda[3:6].detach(), torch.zeros(3))


def test_new_ranks_cannot_exceed_the_space():
    a = _svd(nn.Linear(4, 9), r=3, cap=6)
    with pytest.raises(ValueError, match="3 active ranks of a 4-dimensional space leave room for 1"):
        a.activate([3, 4], generator=torch.Generator().manual_seed(0))
    assert a.rank == 3  # nothing switched on
    a.activate([3], generator=torch.Generator().manual_seed(0))
    assert a.rank == 4


def test_merge_unmerge_exact_and_idempotent():
    torch.manual_seed(0)
    a = _svd(nn.Linear(7, 5))
    x = torch.randn(4, 7)
    w0 = a.base_layer.weight.detach().clone()
    y = a(x)
    a.merge()
    a.merge()
    assert_close(a(x), y)
    assert a.merged
    with pytest.raises(RuntimeError, match="unmerge"):
        a.deactivate([0])
    a.unmerge()
    a.unmerge()
    assert torch.equal(a.base_layer.weight, w0)
    assert_close(a(x), y)


def test_disabled_mode_is_base():
    torch.manual_seed(0)
    a = _svd(nn.Linear(7, 5))
    x = torch.randn(4, 7)
    a.disabled = True
    assert torch.equal(a(x), a.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(dtype)
    a = _svd(base)
    assert a.lora_P.dtype == torch.float32  # fp32 adapters on half bases
    x = torch.randn(3, 8, dtype=dtype)
    y = a(x)
    assert y.dtype == dtype
    ref = (base(x).float()
           + x.float() @ (a.lora_Q * a.lora_lambda[:, None] * a.active[:, None]).t() @ a.lora_P.t() * a.scaling)
    assert_close(y.float(), ref, dtype=dtype)  # one rounding to the half dtype at the end
    a.activate([4], generator=torch.Generator().manual_seed(0))
    assert a.lora_Q.dtype == torch.float32
    b = SVDAdapter(nn.Linear(8, 6).to(torch.bfloat16), r=2, capacity=4, lora_alpha=2, dtype=torch.bfloat16)
    b.activate([3], generator=torch.Generator().manual_seed(0))
    assert b.lora_Q.dtype == torch.bfloat16  # new ranks keep the parameter dtype


def test_gated_lora_matches_peft_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(7, 5))
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = ref.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a = GatedLoRAAdapter(copy.deepcopy(base[0]), r=3, capacity=5, lora_alpha=6)
    with torch.no_grad():
        a.lora_A[:3] = layer.lora_A["default"].weight
        a.lora_B[:, :3] = layer.lora_B["default"].weight
    x = torch.randn(4, 7)
    assert_close(a(x), ref(x))
    # gating a rank off equals removing it
    a.deactivate([2])
    with torch.no_grad():
        layer.lora_B["default"].weight[:, 2] = 0
    assert_close(a(x), ref(x))


def test_orthogonal_penalty_matches_peft_adalora():
    """Our R equals PEFT AdaLoRA's regulariser for the same P, Q (unsquared Frobenius, mean over tensors)."""
    from peft import AdaLoraConfig, get_peft_model

    import elalora

    model = tiny_bert()
    ref = get_peft_model(copy.deepcopy(model), AdaLoraConfig(init_r=3, target_r=2, target_modules=["query", "value"],
                                                             lora_alpha=3, total_step=10, orth_reg_weight=1.0))
    h = elalora.get_model(model, elalora.AdaLoRAConfig(r=2, init_r=3, target_modules=["query", "value"],
                                                       total_steps=10))
    sd = ref.state_dict()
    with torch.no_grad():
        for n, a in zip(h.names, h.adapters):
            pre = f"base_model.model.{n}"
            a.lora_Q.copy_(sd[f"{pre}.lora_A.default"])
            a.lora_P.copy_(sd[f"{pre}.lora_B.default"])
    x = torch.randint(0, 100, (2, 5))
    ada = ref.base_model  # AdaLoraModel.forward adds orth_reg_weight * R to the loss
    ada.train()
    out = ada(input_ids=x, labels=torch.tensor([0, 1]))
    ada.peft_config["default"].orth_reg_weight = 0.0
    task = ada(input_ids=x, labels=torch.tensor([0, 1])).loss
    expected = out.loss - task
    assert_close(h.orthogonal_loss(), expected)


def test_orth_reg_is_added_to_the_loss_in_training_only_and_ignores_inactive_slots():
    import elalora

    model = tiny_bert()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, form="svd", b=1, orth_reg_weight=0.3))
    x, y = torch.randint(0, 100, (2, 6)), torch.tensor([0, 1])
    model.eval()
    plain = model(input_ids=x, labels=y).loss
    model.train()
    with_reg = model(input_ids=x, labels=y).loss
    assert_close(with_reg, plain + 0.3 * h.orthogonal_loss())
    assert with_reg.item() > plain.item()
    r0 = h.orthogonal_loss().detach()
    with torch.no_grad():  # junk in an inactive slot must not count
        h.adapters[0].lora_Q[3].normal_()
        h.adapters[0].lora_P[:, 3].normal_()
    assert_close(h.orthogonal_loss().detach(), r0)
    h.remove_hooks()
    assert_close(model(input_ids=x, labels=y).loss, plain)


def test_default_targets_for_vit():
    from transformers import ViTConfig, ViTForImageClassification

    import elalora

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=37))
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, form="svd", b=1, modules_to_save=["classifier"]))
    assert len(h.adapters) == 12  # q, k, v, o, fc1, fc2 in each of 2 blocks; the head stays out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h.adapters[0].lora_lambda.normal_()
    assert model(pixel_values=x).logits.shape == (2, 2)


# ----------------------------------------------------------------- why γ defaults to 0 (planted-rank study)
def test_task_gradient_on_P_Q_is_zero_at_the_svd_start_but_the_regulariser_gradient_is_not():
    """At the SVD-form start (λ = 0) ``∂L/∂P = s·G·Qᵀ·diag(λ) = 0`` and ``∂L/∂Q = 0`` exactly, while
    ``∂R/∂P, ∂R/∂Q`` are not: under Adam (per-element normalised steps) any γ > 0 alone decides the
    first updates of P and Q, and keeps deciding them while the task gradient (∝ λ) stays smaller."""
    import elalora

    model = tiny_bert()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, form="svd", target_modules=["query", "value"],
                                                       orth_reg_weight=0.0))
    model.train()
    x, y = torch.randint(0, 100, (4, 6)), torch.tensor([0, 1, 0, 1])
    model(input_ids=x, labels=y).loss.backward()
    for a in h.adapters:
        assert torch.count_nonzero(a.lora_P.grad) == 0 and torch.count_nonzero(a.lora_Q.grad) == 0
        assert torch.count_nonzero(a.lora_lambda.grad[a.active]) == a.rank  # only λ learns at first
    model.zero_grad()
    h.orthogonal_loss().backward()
    for a in h.adapters:
        assert a.lora_Q.grad[a.active].norm(dim=1).min() > 0 and a.lora_P.grad[:, a.active].norm(dim=0).min() > 0


@pytest.mark.parametrize("r", [2, 8])
@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_unsquared_orth_penalty_gradient_does_not_vanish_near_orthonormality(r, eps):
    """``∇_Q ‖QQᵀ − I‖_F = 2 M Q / ‖M‖`` (``M = QQᵀ − I``) has Frobenius norm → 2 as Q → orthonormal,
    however close it gets: a constant pull of size 2/√r per rank row (it shrinks as the matrix's rank
    grows), unlike the papers' squared norm whose gradient ``4 M Q`` vanishes there."""
    base = nn.Linear(64, 64)
    a = SVDAdapter(base, r=r, capacity=r, lora_alpha=r, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, r, generator=g, dtype=torch.float64))
        a.lora_Q.copy_((q.t() + eps * torch.randn(r, 64, generator=g, dtype=torch.float64)).float())
        p, _ = torch.linalg.qr(torch.randn(64, r, generator=g, dtype=torch.float64))
        a.lora_P.copy_(p.float())  # exactly orthonormal up to float32 rounding
    m = a.lora_Q @ a.lora_Q.t() - torch.eye(r)
    unsq = torch.autograd.grad(torch.linalg.matrix_norm(m), a.lora_Q)[0]
    sq = torch.autograd.grad(torch.linalg.matrix_norm(a.lora_Q @ a.lora_Q.t() - torch.eye(r)) ** 2, a.lora_Q)[0]
    assert abs(unsq.norm().item() - 2.0) < 10 * eps + 1e-3
    assert unsq.norm(dim=1).mean().item() == pytest.approx(2 / r**0.5, rel=0.3)
    assert sq.norm().item() < 8 * eps * (64 * r) ** 0.5  # ∝ the distance to orthonormality (→ 0)


def test_orth_reg_is_off_by_default():
    import elalora
    from elalora.cli.main import build_parser

    assert elalora.ElaLoRAConfig().orth_reg_weight == 0.0 and elalora.AdaLoRAConfig().orth_reg_weight == 0.0
    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1, target_modules=["query"]))
    assert h._hook is None  # nothing is added to the loss
    args = build_parser().parse_args(["train", "--task", "rte", "--model", "m", "--method", "elalora",
                                      "--output-dir", "o"])
    # the CLI retypes no default: its None is the config's, and the config a run builds has γ = 0
    from elalora.recipe import RunSpec
    from elalora.recipe.methods import build_method_config

    assert args.orth_reg_weight is None
    assert build_method_config(RunSpec.from_namespace(args), None, None).orth_reg_weight == 0.0
