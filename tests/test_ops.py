"""The runtime op against the formula, for any shape, split, bias and dtype."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from velora_fx import ops

TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def test_project_and_reconstruct_pad_the_last_sub_token():
    x = torch.arange(1.0, 11.0).reshape(1, 10)  # d=4: [1..4], [5..8], [9, 10, 0, 0]
    v = torch.tensor([0.5, 0.5, 0.5, 0.5])
    p = ops.project(x, v)
    torch.testing.assert_close(p, torch.tensor([[5.0, 13.0, 9.5]]))
    x_hat = ops.reconstruct(p, v, 10)
    torch.testing.assert_close(x_hat, torch.tensor([[2.5] * 4 + [6.5] * 4 + [4.75] * 2]))


@st.composite
def cases(draw):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    features = draw(st.integers(2, 48))
    d = draw(st.integers(1, features))
    out_features = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    return lead, features, d, out_features, dtype, draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([1.0, 0.1]))


@given(cases())
def test_gradients_match_the_formula(case):
    lead, features, d, out_features, dtype, bias, out_by_in, scale = case
    x = torch.randn(*lead, features, dtype=torch.float64).to(dtype).requires_grad_()
    w_shape = (out_features, features) if out_by_in else (features, out_features)
    w = torch.randn(w_shape, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(out_features, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    v = F.normalize(torch.randn(d, dtype=torch.float64), dim=0).float()
    g = torch.randn(*lead, out_features, dtype=torch.float64).to(dtype)

    y = ops.velora_linear(x, w, b, v, scale, out_by_in)
    y.backward(g)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b_ref = None if b is None else b.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref if out_by_in else w_ref.t(), b_ref)
    y_ref.backward(g)

    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad, rtol=0, atol=0)
    x_hat = ops.reconstruct(ops.project(x.detach().double(), v.double()), v.double(), features).reshape(-1, features)
    g2 = g.double().reshape(-1, out_features)
    expected = scale * (g2.t() @ x_hat if out_by_in else x_hat.t() @ g2)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(w.grad.double(), expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=rtol)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


def test_needs_input_grad_frozen_weight_keeps_nothing_for_dw():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16)
    v = F.normalize(torch.ones(4), dim=0)
    saved, y = _saved(lambda: ops.velora_linear(x, w.requires_grad_(False), None, v))
    # the plain op: a frozen weight keeps only itself (for dx), never x
    assert [t.data_ptr() for t in saved] == [w.data_ptr()]

    w.requires_grad_(True)
    x_frozen = x.detach()
    saved, y = _saved(lambda: ops.velora_linear(x_frozen, w, None, v))
    assert [t.shape for t in saved] == [torch.Size([8, 4]), torch.Size([4])]  # p and v, no weight
    y.sum().backward()
    assert w.grad is not None


def test_autocast_keeps_projections_in_the_activation_dtype():
    x = torch.randn(6, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 8)
    v = F.normalize(torch.ones(8), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, y = _saved(lambda: ops.velora_linear(x, lin.weight, lin.bias, v))
        y_ref = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert saved[0].dtype == torch.bfloat16 and saved[0].shape == (6, 4)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32


def test_initial_direction():
    x = torch.tensor([[3.0, 4.0, 3.0, 4.0]])
    torch.testing.assert_close(ops.initial_direction(x, 2, "l"), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(ops.initial_direction(torch.zeros(3, 4), 2, "l"), torch.full((2,), 2**-0.5))
    with pytest.raises(ValueError, match="calibration batch of my.layer holds NaN or inf"):
        ops.initial_direction(torch.tensor([[1.0, float("inf")]]), 2, "my.layer")


def test_refreshed_direction_keeps_v_on_bad_batches():
    v = torch.tensor([1.0, 0.0])
    for bad in (torch.zeros(2, 2), torch.full((2, 2), float("nan"))):
        assert torch.equal(ops.refreshed_direction(v, bad, None), v)
        assert torch.equal(ops.refreshed_direction(v, bad, 0.9), v)
    torch.testing.assert_close(ops.refreshed_direction(v, torch.tensor([[0.0, 2.0]]), None), torch.tensor([0.0, 1.0]))
    mixed = ops.refreshed_direction(v, torch.tensor([[0.0, 2.0]]), 0.5)
    torch.testing.assert_close(mixed, F.normalize(torch.tensor([0.5, 0.5]), dim=0))


def test_random_direction_is_seeded_per_name():
    a = ops.random_direction(16, 0, "layers.0.weight")
    assert torch.equal(a, ops.random_direction(16, 0, "layers.0.weight"))
    assert not torch.equal(a, ops.random_direction(16, 1, "layers.0.weight"))
    assert not torch.equal(a, ops.random_direction(16, 0, "layers.1.weight"))
    torch.testing.assert_close(a.norm(), torch.tensor(1.0))
