"""Adding an estimator is one new file and one registry line (docs/design.md): this module is that file for a toy
estimator that keeps the input in bfloat16, and the test adds the line (``estimators.CODECS``). Both routes then
train with it, unchanged: ``dx`` exact, ``dW = gᵀ bf16(x)``; its settings round-trip through ``to_dict``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import velora_fx
from velora_fx import VeloraConfig, estimators
from velora_fx.codec import Estimator
from velora_fx.settings import ESTIMATORS, EstimatorSettings


# -- the new file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bfloat16(EstimatorSettings):
    """Keep the input in bfloat16 (16 bits per element)."""

    name: ClassVar[str] = "bfloat16_test"


class Bfloat16Codec(Estimator):
    field = "key"  # the state: a placeholder scalar (this codec needs none)
    traced = True  # it keeps a representation of every coordinate: the report counts bits per element

    def basis_shape(self, features):
        return (1, 1), ""

    def state_shape(self, basis_shape):
        return (1,)

    def initial(self, basis_shape, name):
        return torch.ones(1), self._step()

    def statistics(self, x, basis_shape):
        return torch.zeros(1, dtype=torch.float64), 0

    def calibrated(self, total, count, name, basis_shape):
        return torch.ones(1)

    def encode(self, x, state, basis_shape):
        return (x.reshape(-1, x.shape[-1]).to(torch.bfloat16),)

    def decode(self, saved, state, basis_shape, features, dtype):
        return saved[0].to(dtype)

    def kept_bytes(self, shape, dtype, basis_shape):
        n = 1
        for s in shape:
            n *= int(s)
        return 2 * n

    def per_token(self, features, basis_shape):
        return 16


# -- the test -------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(estimators.CODECS, Bfloat16, Bfloat16Codec)  # the one registry line
    estimators.for_config.cache_clear()
    yield VeloraConfig(estimator=Bfloat16())
    estimators.for_config.cache_clear()


@pytest.mark.parametrize("route", ["compile", "fx"])
def test_a_new_estimator_trains_on_both_routes(registered, route):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 16, 32)
    if route == "compile":
        run = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(registered))
    else:
        model = run = velora_fx.transform(torch.fx.symbolic_trace(model), registered)
    xs = x.clone().requires_grad_()
    run(xs).pow(2).sum().backward()
    xr = x.clone().requires_grad_()
    pre = reference.fc1(xr)
    pre.retain_grad()
    reference.fc2(torch.tanh(pre)).pow(2).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)  # dx exact
    params = dict(model.named_parameters())
    # fc1 reads the model's input, exact on both routes: its dW is gᵀ bf16(x) (fc2's input is a tanh, whose last
    # bit Inductor may round otherwise than eager, which can flip its bfloat16 rounding)
    want = pre.grad.reshape(-1, 64).t() @ x.reshape(-1, 32).to(torch.bfloat16).float()
    if route == "compile" and not velora_fx.report(model).graphs[-1].projection_bytes:
        # torch 2.11's partitioner keeps the graph's input itself (the caller holds it anyway: no byte more) and
        # recomputes this codec's one op, a cast, in backward, where Inductor folds the round trip: dW is exact
        want = reference.fc1.weight.grad
    torch.testing.assert_close(params["fc1.weight"].grad, want, rtol=1e-4, atol=1e-5)
    if want is not reference.fc1.weight.grad:
        assert not torch.allclose(params["fc1.weight"].grad, reference.fc1.weight.grad, rtol=1e-5, atol=1e-6)
    for name in ("fc1.bias", "fc2.bias"):  # db exact
        torch.testing.assert_close(params[name].grad, dict(reference.named_parameters())[name].grad)
    rep = velora_fx.report(model)
    (fc1,) = [r for r in rep if r.weight == "fc1.weight"]
    assert (fc1.status, fc1.estimator, fc1.per_token) == ("compressed", "bfloat16_test", 16)
    assert fc1.bytes_after == fc1.bytes_before // 2  # fp32 -> bf16


def test_its_settings_register_themselves_and_round_trip(registered):
    assert ESTIMATORS["bfloat16_test"] is Bfloat16
    assert VeloraConfig.from_dict(registered.to_dict()) == registered
