"""What runs at training time around a graph the backend compiled.

``CompiledGraph`` wraps Inductor's compiled joint graph. On every call it
feeds each basis input from the projection of the parameter the graph
received (bound once per parameter object, NOTE [the state model] in
``state.py``), calibrates projections that are not calibrated yet on the
batch at hand, and writes back the bases the graph refreshed. It also
remembers, weakly, which parameters each call used, so that
``velora_fx.report(model)`` can name every site of every model instance that
ran through this graph (``records``).

NOTE [one basis per input]
Weights that read the same input (q/k/v of one attention, gate/up of one
SwiGLU) calibrate the same basis anyway under every VeLoRA init but
``random``: ``v`` is the normalised mean sub-token of that input, and
``batch_average`` / ``ema`` refresh it from that input too. So they use one
basis (the first weight's: the others' ``ParamSlot.leader`` names it), and the
joint-graph pass keeps one ``p`` for all of them instead of one per weight:
for q/k/v, a third of the bytes of ``p`` and of the projection work. Each
weight still has its own projection in the state (its ``leader`` is the first
weight's), so ``state_dict()`` lists every weight and each ``dW`` is the
formula with its own (shared) basis. A checkpoint whose shared projections
differ (written by other code) is warned about, and the first weight's basis
is used. Weights of one input with different sizes (``VeloraConfig.overrides``)
share by size: one basis and one ``p`` per (input, size). The FX route
(``velora_fx.transform``) follows the same rule.

NOTE [one basis on every rank]
Under data parallelism (DDP, FSDP) every rank must project with the same
basis, or the all-reduced weight gradient mixes different subspaces. When
``torch.distributed`` is initialised with more than one rank, calibration
uses the *global* first batch: each rank sums its estimator statistics
(float64) with their counts, one ``all_reduce`` over the default process
group adds them up, and every rank computes the same basis (NaN/inf on any
rank raises on every rank). There is one ``all_reduce`` per calibrating
graph call, on every rank that calls the graph for the first time with
uncalibrated projections: all ranks must start from the same state (all
fresh, or all loaded from one checkpoint) and run the same graphs in the
same order, which data parallelism does anyway. Bases refreshed inside the
graph from each rank's own batch (``init="batch_average"`` / ``"ema"``) are
refused under ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from velora_fx import _torch_internals as ti
from velora_fx import lifecycle
from velora_fx.codec import Estimator
from velora_fx.dynamo_graph import ParamUse
from velora_fx.passes.contract import GraphSpec, PlannedSite
from velora_fx.projection import Projection
from velora_fx.records import COMPRESSED, GraphSummary, SiteRecord
from velora_fx.state import attached, find_owner, named_parameters, projections, strip_compiled

__all__ = ["CompiledGraph", "records", "distributed"]

log = logging.getLogger(__name__)

_ORDER = itertools.count()


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialised ``torch.distributed`` job."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _takes_varargs(fn: Callable) -> bool:
    """Whether ``fn`` takes its inputs as ``*args`` (else: one boxed list)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


@dataclasses.dataclass(eq=False)
class InstanceRecord:
    """What one set of parameters did in one graph, for ``velora_fx.report``: per slot, the parameter (weakly),
    the prepared model's state it belongs to (weakly, or ``None``), and its name there (else the name from the
    Dynamo source). Kept by what it describes, never the other way round: each parameter (a weak table) and each
    prepared model's state hold their records, so a report outlives ``torch._dynamo.reset()`` but not the model."""

    graph: str
    order: tuple[int, int]
    sites: Sequence[PlannedSite]
    summary: Optional[GraphSummary]
    params: tuple[weakref.ref, ...]
    owners: tuple[Optional[weakref.ref], ...]
    names: tuple[str, ...]

    def alive(self) -> bool:
        return any(p() is not None for p in self.params)

    def same(self, args: list, primals: Sequence[int]) -> bool:
        return all(p() is args[i] for p, i in zip(self.params, primals))

    def render(self, names_of: dict[int, str], prefixes: dict[int, str]) -> list[SiteRecord]:
        """The records of the slots that belong to the model behind ``names_of`` / ``prefixes``, named there."""
        names, inside = list(self.names), set()
        for k, (param, owner) in enumerate(zip(self.params, self.owners)):
            o = owner() if owner is not None else None
            p = param()
            if o is not None and id(o) in prefixes:
                names[k] = f"{prefixes[id(o)]}{self.names[k]}"
                inside.add(k)
            elif p is not None and id(p) in names_of:
                names[k] = names_of[id(p)]
                inside.add(k)
        return [s.render(self.graph, names) for s in self.sites if s.slot in inside]


_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> its InstanceRecords


class CompiledGraph:
    """Inductor's compiled graph plus its runtime inputs: one basis per compressed input.

    Keeps the calling convention of what ``compile_fx`` returned: Dynamo calls
    it with the graph inputs as positional arguments, yet it carries
    ``_boxed_call=True`` (copied from AOTAutograd's boxed runtime wrapper); a
    caller that trusts the attribute passes one list. Both are accepted, and
    the inner callable is called the way its signature takes.
    """

    def __init__(self, compiled, dynamo_gm: torch.fx.GraphModule, spec: GraphSpec, uses: dict[int, ParamUse],
                 sites: list[PlannedSite], n_refresh: int, estimator: Estimator,
                 summary: Optional[GraphSummary] = None):  # fmt: skip
        self.compiled = compiled
        if hasattr(compiled, "_boxed_call"):
            self._boxed_call = compiled._boxed_call
        self._inner_takes_list = not _takes_varargs(compiled)
        self.dynamo_gm = dynamo_gm
        self.spec = spec
        self.uses = uses
        self.sites = sites
        self.n_refresh = n_refresh
        self.estimator = estimator
        self.summary = summary
        slots = spec.slots
        self.leaders = [k for k, s in enumerate(slots) if s.basis_primal is not None and s.leader is None]
        self.followers = {k: [f for f, s in enumerate(slots) if s.leader == k] for k in self.leaders}
        used = {s.slot for s in sites if s.status == COMPRESSED}
        self.used = [any(j in used for j in (k, *self.followers[k])) for k in self.leaders]
        self._primals = [s.primal for s in slots]
        self._bindings = WeakIdKeyDictionary()  # parameter -> the projection its basis input reads
        self._instances: list[InstanceRecord] = []
        self._by_first: dict[int, InstanceRecord] = {}  # id of an instance's first parameter -> the instance
        self._last_first: Optional[weakref.ref] = None
        self.order = next(_ORDER)

    # -- binding -------------------------------------------------------------------------------

    def _bind(self, args: list, k: int) -> Projection:
        """The projection of the leader of slot ``k`` (created when new), its followers sharing it."""
        proj = self._projection(args, k)
        for f in self.followers[k]:
            self._projection(args, f, leader=proj)
        self._bindings[args[self.spec.slots[k].primal]] = proj
        return proj

    def _projection(self, args: list, k: int, leader: Optional[Projection] = None) -> Projection:
        slot = self.spec.slots[k]
        param = args[slot.primal]
        owner = find_owner(param)
        name = owner.name_of(param) if owner is not None else slot.name
        return lifecycle.bind(param, name, owner, self.estimator, slot.basis_shape, slot.features, leader=leader)

    def _note_instance(self, args: list) -> None:
        """Remember (weakly) the parameters of this call, for ``records``, if this set of parameters is new."""
        known = self._by_first.get(id(args[self._primals[0]]))
        if known is not None and known.same(args, self._primals):
            return
        self._instances = [inst for inst in self._instances if inst.alive()]
        self._by_first = {id(inst.params[0]()): inst for inst in self._instances if inst.params[0]() is not None}
        params, owners, names = [], [], []
        for slot in self.spec.slots:
            param = args[slot.primal]
            owner = find_owner(param)
            params.append(weakref.ref(param))
            owners.append(weakref.ref(owner) if owner is not None else None)
            names.append(owner.name_of(param) if owner is not None else slot.name)
        record = InstanceRecord(self.spec.name, (self.order, next(_ORDER)), self.sites, self.summary, tuple(params),
                                tuple(owners), tuple(names))  # fmt: skip
        self._instances.append(record)
        self._by_first[id(args[self._primals[0]])] = record
        for slot in self.spec.slots:
            _RECORDS.setdefault(args[slot.primal], []).append(record)
        for owner in {id(o()): o() for o in owners if o is not None}.values():
            owner.instance_records.append(record)

    # -- calibration ---------------------------------------------------------------------------

    def _from_batch(self, args: list, calibrate: list[tuple[int, Projection]],
                    refresh: list[tuple[int, Projection, int]]) -> None:  # fmt: skip
        """Calibrate (``calibrate``) or refresh (``refresh``: with the refresh index) projections from this batch:
        run the Dynamo graph eagerly, without grad, capture each weight's input, reduce it to the estimator's
        statistics (summed over ranks), and set the new bases."""
        items = [(k, proj) for k, proj in calibrate] + [(k, proj) for k, proj, _ in refresh]
        watch: dict[torch.fx.Node, list[int]] = {}
        for k, _ in items:
            for matmul, _inp in self.uses[self.spec.slots[k].primal].uses:
                watch.setdefault(matmul, []).append(k)
        captured: dict[int, list[torch.Tensor]] = {k: [] for k, _ in items}
        uses, spec = self.uses, self.spec

        class Capture(torch.fx.Interpreter):
            def run_node(self, n):
                for k in watch.get(n, ()):
                    for matmul, inp in uses[spec.slots[k].primal].uses:
                        if matmul is n:
                            captured[k].append(self.env[inp].detach())
                return super().run_node(n)

        inputs = [a.clone() if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) else a for a in args]
        devices = {a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"}
        with torch.no_grad(), torch.random.fork_rng(devices=list(devices)):
            Capture(self.dynamo_gm).run(*inputs)
        del inputs
        est, stats = self.estimator, []
        for i, (k, proj) in enumerate(items):
            slot = self.spec.slots[k]
            xs = [x.reshape(-1, slot.features) for x in captured[k]]
            x = xs[0] if len(xs) == 1 else torch.cat(xs) if xs else torch.zeros(0, slot.features)
            stats.append(lifecycle.statistics(est, proj, x, slot.basis_shape, refreshing=i >= len(calibrate)))
        if distributed():  # see NOTE [one basis on every rank]
            stats = _all_reduce(stats, items[0][1].basis.device)
        for (k, proj), (total, count) in zip(calibrate, stats):
            lifecycle.calibrate(proj, est, total, count, self.spec.slots[k].basis_shape, proj.weight)
        for (_, proj, index), (total, count) in zip(refresh, stats[len(calibrate):]):
            lifecycle.refresh(proj, est, index, total, count)

    # -- the call ------------------------------------------------------------------------------

    def __call__(self, *call_args: Any) -> Any:
        if len(call_args) == 1 and type(call_args[0]) is list:
            args = call_args[0]  # boxed: the callee frees the inputs by clearing the list
        else:
            args = list(call_args)
        if any(ti.is_fake(a) for a in args):
            return self._call_fake(args)
        est = self.estimator
        projs: list[Optional[Projection]] = []
        calibrate, refresh, rebound = [], [], False
        for k, used in zip(self.leaders, self.used):
            if not used:  # the plan compresses none of its sites: the input is not read
                projs.append(None)
                continue
            param = args[self.spec.slots[k].primal]
            proj = self._bindings.get(param)
            if proj is None:
                proj, rebound = self._bind(args, k), True
            projs.append(proj)
            index = lifecycle.begin_step(proj, est)
            if not proj.calibrated:
                calibrate.append((k, proj))
            elif index is not None:
                refresh.append((k, proj, index))
        if self._primals and (rebound or self._last_first is None or self._last_first() is not args[self._primals[0]]):
            self._last_first = weakref.ref(args[self._primals[0]])
            self._note_instance(args)
        if calibrate or refresh:
            self._from_batch(args, calibrate, refresh)
        for k, proj in zip(self.leaders, projs):
            device = args[self.spec.slots[k].primal].device
            args.append(torch.zeros(est.state_shape(self.spec.slots[k].basis_shape), device=device)
                        if proj is None else proj.graph_input(device))  # fmt: skip
        if self._inner_takes_list:
            outs = self.compiled(args)
        else:
            full = tuple(args)
            args.clear()
            outs = self.compiled(*full)
            del full
        if self.n_refresh:  # bases the graph refreshed itself (batch_average / ema): take them
            outs = list(outs)
            refreshed = outs[len(outs) - self.n_refresh :]
            del outs[len(outs) - self.n_refresh :]
            for proj, new in zip(projs, refreshed):
                if proj is not None:
                    proj.set_basis(new)
        return outs

    def _call_fake(self, args: list) -> Any:
        """A call on fake inputs while compiling (DDPOptimizer runs each compiled split): shapes only, nothing bound."""
        for k in self.leaders:
            slot = self.spec.slots[k]
            args.append(torch.zeros(self.estimator.state_shape(slot.basis_shape), device=args[slot.primal].device))
        outs = self.compiled(args) if self._inner_takes_list else self.compiled(*args)
        if self.n_refresh:
            outs = list(outs)[: len(outs) - self.n_refresh]
        return outs



def records(obj: Any) -> tuple[list[SiteRecord], list[GraphSummary]]:
    """The records of every compiled graph that trained parameters of ``obj``, named as in ``obj``, and the
    partition summary of each such graph (with the number of ``obj``'s instances it ran for)."""
    root = ti.unwrap_optimized_module(obj)
    if not isinstance(root, nn.Module):
        return [], []
    names_of: dict[int, str] = {}
    for name, p in named_parameters(root):
        names_of.setdefault(id(p), name)
    prefixes, found = {}, {}
    for name, module in root.named_modules():
        container = attached(module)
        if container is not None:
            prefixes[id(container)] = f"{strip_compiled(name)}." if strip_compiled(name) else ""  # "module." (DDP)
            found.update((id(r), r) for r in container.instance_records)
    for _, p in named_parameters(root):
        found.update((id(r), r) for r in _RECORDS.get(p, ()))
    # One step's worth: newest first, a graph whose weights a newer graph already covers was replaced by it (a
    # recompile: another shape, another mode) and is left out; graphs of disjoint weights (graph breaks, per-block
    # compile) are all part of the step. Each weight is listed once, as its newest graph compiled it.
    out: list[SiteRecord] = []
    instances: dict[int, list[InstanceRecord]] = {}
    projs = projections(root)
    listed: set[str] = set()
    for record in sorted(found.values(), key=lambda r: r.order, reverse=True):
        rendered = [dataclasses.replace(r, last_refresh=projs[r.weight].last_refresh) if r.weight in projs else r
                    for r in record.render(names_of, prefixes)]  # fmt: skip
        new = [r for r in rendered if r.weight not in listed]
        if rendered and not new:
            continue
        listed.update(r.weight for r in new)
        out.extend(reversed(new))
        if rendered or not record.sites:
            instances.setdefault(record.order[0], []).append(record)
    out.reverse()
    graphs = [dataclasses.replace(recs[0].summary, instances=len(recs)) for _, recs in sorted(instances.items())
              if recs[0].summary is not None]  # fmt: skip
    return out, graphs


def _all_reduce(stats: list[tuple[torch.Tensor, int]], device) -> list[tuple[torch.Tensor, int]]:
    """Sum every ``(total, count)`` over the ranks of the default process group, with one ``all_reduce``."""
    sizes = [t.numel() for t, _ in stats]
    packed = torch.cat([t.reshape(-1).to(device, torch.float64) for t, _ in stats]
                       + [torch.tensor([float(c) for _, c in stats], dtype=torch.float64, device=device)])  # fmt: skip
    torch.distributed.all_reduce(packed)
    out, offset = [], 0
    for (t, _), n in zip(stats, sizes):
        out.append((packed[offset : offset + n].reshape(t.shape), 0))
        offset += n
    counts = packed[offset:].tolist()
    return [(total, int(c)) for (total, _), c in zip(out, counts)]
