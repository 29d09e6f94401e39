"""velora_fx.backend under torch.distributed: DDP (DDPOptimizer, several graphs) and FSDP2, gloo on CPU.

One spawn of 2 processes (localhost, a free port) runs both scenarios; each
rank writes what it saw to files, and the asserts run here, against a
single-process compile on the concatenated batch:

* every rank calibrates the same ``v``, from the global first batch (NOTE [one v on every rank]);
* gradients after one step equal the single-process run with the same ``v`` (reduction order only);
* the checkpoint (the plain state dict from rank 0 for DDP, ``torch.distributed.checkpoint`` for FSDP2) restores ``v``.

A hang fails the test (process-group and join timeouts) instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import velora_fx
from velora_fx import PrincipalRandom, Quantized, Velora, VeloraConfig, ops
from velora_fx.report import COMPRESSED

from .helpers import directions

WORLD = 2
CFG = VeloraConfig(estimator=Velora(num_groups=8))
PR_CFG = VeloraConfig(estimator=PrincipalRandom(rank=6, refresh_every=2))
Q_CFG = VeloraConfig(estimator=Quantized(bits=2, group_size=8))
TIMEOUT_S = 240
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class Block(nn.Module):
    """A small LLaMA-like MLP block: RMSNorm, gated MLP, residual."""

    def __init__(self, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(WORLD * 2, 5, 16, generator=g) + 0.5, torch.randn(WORLD * 2, 5, 16, generator=g)


def _v(model):
    return directions(model)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    try:
        x, r = (t.chunk(WORLD)[rank] for t in _batch())

        # DDP: tiny buckets, so DDPOptimizer splits the graph (several graphs, each calibrating its own weights)
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 1024  # DDPOptimizer asserts first bucket <= bucket cap
        torch.manual_seed(0)
        model = velora_fx.prepare(Net())
        graphs = []
        backend = velora_fx.make_backend(CFG)

        def counting(gm, example_inputs, **kwargs):
            graphs.append(gm)
            return backend(gm, example_inputs, **kwargs)

        ddp = DDP(model, bucket_cap_mb=0.002)
        compiled = torch.compile(ddp, backend=counting)
        (compiled(x) * r).sum().backward()
        result = {
            "graphs": len(graphs),
            "v": _v(model),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "report": [(rec.weight, rec.status) for rec in velora_fx.report(ddp)],
        }
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out, "ddp_state.pt"))
        dist.barrier()

        # FSDP2: one fully_shard on the root, the whole model compiled
        from torch.distributed.fsdp import fully_shard

        torch._dynamo.reset()
        torch.manual_seed(0)
        model = velora_fx.prepare(Net())
        fully_shard(model)
        compiled = torch.compile(model, backend=velora_fx.make_backend(CFG))
        (compiled(x) * r).sum().backward()
        result["fsdp_v"] = _v(model)
        result["fsdp_grads"] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        result["fsdp_report"] = [(rec.weight, rec.status) for rec in velora_fx.report(model)]

        import torch.distributed.checkpoint as dcp

        ckpt = os.path.join(out, "dcp")
        dcp.save(model.state_dict(), checkpoint_id=ckpt)
        torch.manual_seed(1)
        fresh = velora_fx.prepare(Net())
        fully_shard(fresh)
        # dcp.load fills the tensors of the state_dict it is given: create the projections first (any values)
        fresh.load_state_dict({f"velora_fx.{k}.v": torch.zeros_like(v) for k, v in result["fsdp_v"].items()},
                              strict=False)  # fmt: skip
        state = fresh.state_dict()
        dcp.load(state, checkpoint_id=ckpt)
        fresh.load_state_dict(state)
        result["dcp_v"] = _v(fresh)
        result["dcp_params_equal"] = all(
            torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), fresh.parameters())
        )
        # FSDP2 per block + root with each block compiled (torchtitan's recipe), in both per-block compile styles
        for style in ("replace", "module.compile"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = velora_fx.prepare(Net())
            for i, block in enumerate(model.blocks):
                if style == "replace":  # torchtitan: compile, register in place, then shard
                    compiled_block = torch.compile(block, backend=velora_fx.make_backend(CFG))
                    model.blocks.register_module(str(i), compiled_block)
                    fully_shard(compiled_block)
                else:  # shard, then nn.Module.compile
                    fully_shard(block)
                    block.compile(backend=velora_fx.make_backend(CFG))
            fully_shard(model)
            (model(x) * r).sum().backward()
            result[f"{style}_v"] = _v(model)
            result[f"{style}_grads"] = {n.replace("._orig_mod", ""): p.grad.full_tensor().clone()
                                        for n, p in model.named_parameters()}  # fmt: skip
            result[f"{style}_report"] = [(rec.weight, rec.status) for rec in velora_fx.report(model)]
        # a token-level estimator refreshed every 2 steps under DDP: every rank holds the same basis at every step
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = velora_fx.prepare(Net())
        ddp = DDP(model)
        compiled = torch.compile(ddp, backend=velora_fx.make_backend(PR_CFG))
        result["pr_bases"] = []
        for step in range(3):
            g = torch.Generator().manual_seed(100 + step)
            xs = torch.randn(WORLD * 2, 5, 16, generator=g) + 0.5
            (compiled(xs.chunk(WORLD)[rank]) * r).sum().backward()
            result["pr_bases"].append(_v(model))
        # the quantized estimator under DDP: every rank draws with the same keys, a new key every step
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = velora_fx.prepare(Net())
        compiled = torch.compile(DDP(model), backend=velora_fx.make_backend(Q_CFG))
        result["q_keys"] = []
        for step in range(2):
            xs = torch.randn(WORLD * 2, 5, 16, generator=torch.Generator().manual_seed(200 + step)) + 0.5
            (compiled(xs.chunk(WORLD)[rank]) * r).sum().backward()
            result["q_keys"].append(_v(model))
        result["q_report"] = [(rec.weight, rec.status) for rec in velora_fx.report(model)]
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the distributed workers did not finish within {TIMEOUT_S} s (a hang)")
    return out, [torch.load(os.path.join(out, f"rank{i}.pt")) for i in range(WORLD)]


def _reference(state):
    """One process, the concatenated batch, the v of ``state``: gradients of the same (rank-averaged) loss."""
    torch._dynamo.reset()
    model = velora_fx.prepare(Net())
    model.load_state_dict(state)
    compiled = torch.compile(model, backend=velora_fx.make_backend(CFG))
    x, r = _batch()
    (compiled(x) * r).sum().div(WORLD).backward()
    return model, {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(ranks):
    out, _ = ranks
    return _reference(torch.load(os.path.join(out, "ddp_state.pt")))


def _linear_inputs(x) -> dict[str, torch.Tensor]:
    """The input of every linear of the seeded ``Net`` on ``x`` (eager, one process: the whole global batch)."""
    torch.manual_seed(0)
    eager = Net()
    seen = {}
    for name, mod in eager.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach()))
    eager(x)
    return seen


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())), msg=lambda m: f"{what}: {m}")


def test_ddp_several_graphs_all_compressed(ranks):
    _, results = ranks
    for res in results:
        assert res["graphs"] >= 2  # DDPOptimizer split the graph
        statuses = dict(res["report"])
        assert {w for w, s in statuses.items() if s == COMPRESSED} >= {
            f"module.blocks.{i}.{n}.weight" for i in range(2) for n in ("gate", "down")
        }, statuses


@pytest.mark.parametrize("key", ["v", "fsdp_v"])
def test_every_rank_has_the_same_v_from_the_global_first_batch(ranks, key):
    _, results = ranks
    v0 = results[0][key]
    assert len(v0) == 6
    for res in results[1:]:
        assert res[key].keys() == v0.keys()
        assert all(torch.equal(res[key][k], v0[k]) for k in v0)
    # the global rule: v from the concatenation of all ranks' first batches (eager, one process)
    seen = _linear_inputs(_batch()[0])
    for k, v in v0.items():
        module = k[: -len(".weight")]
        _close(v, ops.initial_direction(seen[module], v.shape[0], k), k)
        local = ops.initial_direction(seen[module].chunk(WORLD)[0], v.shape[0], k)
        assert not torch.allclose(v, local, atol=1e-4), f"{k}: rank 0's own batch gives the same v; the test cannot tell"


def test_ddp_gradients_equal_single_process_on_concatenated_batch(ranks, reference):
    _, results = ranks
    model, want = reference
    for res in results:
        for n, g in want.items():
            _close(res["grads"][n], g, n)
    assert all(torch.equal(a, b) for a, b in zip(_v(model).values(), results[0]["v"].values()))  # not recalibrated


def test_ddp_checkpoint_from_rank0_restores_v(ranks, reference):
    out, results = ranks
    state = torch.load(os.path.join(out, "ddp_state.pt"))
    assert {k for k in state if k.startswith("velora_fx.")} == {f"velora_fx.{k}.v" for k in results[0]["v"]}
    model, _ = reference  # velora_fx.load_state_dict into a fresh model, then one compiled step
    for k, v in results[0]["v"].items():
        assert torch.equal(_v(model)[k], v), k


def test_fsdp2_compressed_gradients_and_dcp_checkpoint(ranks, reference):
    _, results = ranks
    _, want = reference
    for res in results:
        statuses = dict(res["fsdp_report"])
        assert sum(s == COMPRESSED for s in statuses.values()) >= 4, statuses
        for k, v in results[0]["v"].items():  # the same rule as DDP (rounding: another graph split)
            _close(res["fsdp_v"][k], v, k)
        for n, g in want.items():
            _close(res["fsdp_grads"][n], g, n)
        assert res["dcp_params_equal"]
        assert res["dcp_v"].keys() == res["fsdp_v"].keys()
        assert all(torch.equal(res["dcp_v"][k], res["fsdp_v"][k]) for k in res["fsdp_v"])


def test_refreshing_init_is_refused_under_distributed(monkeypatch):
    monkeypatch.setattr(velora_fx.compile_backend, "distributed", lambda: True)
    torch._dynamo.reset()
    model = Net()
    compiled = torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8, init="ema"))))
    with pytest.raises(Exception, match="velora_fx: init='ema'.*different v"):
        compiled(torch.randn(2, 3, 16)).sum().backward()


@pytest.mark.parametrize("style", ["replace", "module.compile"])
def test_fsdp2_per_block_compile(ranks, reference, style):
    """FSDP2 on every block and the root, each block compiled: the documented way to shard with the backend. Every
    site reported once under the model's names, the same v on every rank (the global first batch), and gradients
    equal to one process on the concatenated batch."""
    _, results = ranks
    _, want = reference
    sites = {f"blocks.{i}.{n}.weight" for i in range(2) for n in ("gate", "up", "down")}
    for res in results:
        report = res[f"{style}_report"]
        assert sorted(w for w, _ in report) == sorted(sites), report
        assert all(status == COMPRESSED for _, status in report), report
        assert set(res[f"{style}_v"]) == sites
        for k, v in results[0]["v"].items():
            _close(res[f"{style}_v"][k], v, k)
            assert torch.equal(res[f"{style}_v"][k], results[0][f"{style}_v"][k])  # ranks agree exactly
        for n, g in want.items():
            _close(res[f"{style}_grads"][n], g, n)


def test_refreshed_token_estimator_bases_agree_on_every_rank(ranks):
    """principal_random calibrated from the global first batch (X^T X all-reduced) and refreshed from the global
    batch of step 2 (X^T X U all-reduced), re-seeded with the same seeds: every rank, every step, bit for bit."""
    _, results = ranks
    history = results[0]["pr_bases"]
    assert len(history) == 3 and len(history[0]) == 6
    for res in results[1:]:
        for step, bases in enumerate(res["pr_bases"]):
            assert all(torch.equal(bases[k], history[step][k]) for k in history[step]), step
    assert all(torch.equal(history[0][k], history[1][k]) for k in history[0])  # no refresh at step 1
    assert not any(torch.equal(history[1][k], history[2][k]) for k in history[1])  # a refresh at step 2
    # the first basis is the one a single process computes from the concatenated first batch
    from velora_fx.estimators import for_config

    seen = _linear_inputs(torch.randn(WORLD * 2, 5, 16, generator=torch.Generator().manual_seed(100)) + 0.5)
    est = for_config(PR_CFG)
    for k, basis in history[0].items():
        x = seen[k[: -len(".weight")]].reshape(-1, basis.shape[0])
        shape = tuple(basis.shape)
        want = est.calibrated(*est.statistics(x, shape), k, shape)
        _close(basis[:, :3], want[:, :3], k)  # the principal part (the random part is seeded: equal by construction)


def test_quantized_draws_the_same_keys_on_every_rank(ranks):
    _, results = ranks
    keys = results[0]["q_keys"]
    assert len(keys) == 2 and keys[0] and all(v.shape == (1,) for v in keys[0].values())
    assert any(status == "compressed" for _, status in results[0]["q_report"])
    for res in results[1:]:
        assert all(torch.equal(res["q_keys"][s][k], keys[s][k]) for s in range(2) for k in keys[s])
    assert not any(torch.equal(keys[0][k], keys[1][k]) for k in keys[0])  # a new key every step
