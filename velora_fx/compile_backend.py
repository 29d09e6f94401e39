"""The ``torch.compile`` backend: VeLoRA as a joint-graph rewrite inside Inductor.

``torch.compile(model, backend=velora_fx.backend)`` runs Inductor as usual
(decompositions, joint passes, min-cut partitioner, post-grad passes, the FX
and AOTAutograd caches) with one more joint-graph pass
(``velora_fx.passes.joint_graph``) that rewrites the joint forward+backward
graph before it is partitioned. What runs at training time is the wrapper
around Inductor's compiled graph (``_VeloraCompiledGraph``): it feeds one
direction ``v`` per weight as a runtime input, calibrates ``v`` on the first
batch, and refreshes it under ``init="batch_average"`` / ``"ema"``.

How ``v`` lives (see also the docstring of ``make_backend``):

* one ``v`` per weight, a persistent float32 buffer on the module that owns
  the parameter, named ``<param_leaf>_velora_v`` (``layers.0.mlp.down_proj``
  gets ``weight_velora_v``, listed in ``model.state_dict()`` as
  ``layers.0.mlp.down_proj.weight_velora_v``). All zeros means "not
  calibrated yet".
* ``v`` is a graph *input*, looked up at every call from the parameter the
  graph receives, so two instances of one module class sharing one compiled
  graph each use their own ``v``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import operator
import os
import re
import sys
import threading
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from velora_fx import _torch_internals as ti
from velora_fx.config import VeloraConfig
from velora_fx.ops import direction_from_mean, initial_direction, random_direction, refreshed_direction, sub_token_mean
from velora_fx.passes.joint_graph import (
    DIRECTION_OP,
    GraphSpec,
    ParamSlot,
    PlannedSite,
    VeloraJointPass,
    records_from_json,
    records_to_json,
)
from velora_fx.report import COMPRESSED, SiteRecord, attach_records

__all__ = ["make_backend", "backend", "load_state_dict", "VeloraBackend", "V_SUFFIX"]

log = logging.getLogger(__name__)

#: Suffix of the buffer holding a weight's ``v``: ``weight`` -> ``weight_velora_v``.
V_SUFFIX = "_velora_v"

_DEBUG_ENV = "VELORA_FX_DEBUG"


def _debug_enabled() -> bool:
    return os.environ.get(_DEBUG_ENV, "") not in ("", "0") or log.isEnabledFor(logging.DEBUG)


# -- the Dynamo graph: which parameters feed a matmul, and with which input ------------

_LINEAR_FNS = {torch._C._nn.linear, F.linear}
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
_ADDMM_FNS = {torch.addmm, torch.baddbmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_ADDMM_METHODS = {"addmm", "baddbmm"}
_VIEW_FNS = {torch.t, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze, getattr}
_VIEW_METHODS = {
    "t", "transpose", "permute", "view", "reshape", "expand", "contiguous", "to", "float", "half",
    "bfloat16", "type_as", "squeeze", "unsqueeze", "expand_as", "view_as", "reshape_as",
}  # fmt: skip


def _operands(node: torch.fx.Node) -> Optional[tuple[Any, Any]]:
    """``(input, weight)`` operands of a Dynamo-level matmul node, ``None`` for anything else."""
    if node.op == "call_function":
        if node.target in _LINEAR_FNS or node.target in _MATMUL_FNS:
            return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if node.target in _ADDMM_FNS and len(node.args) > 2:
            return node.args[1], node.args[2]
    elif node.op == "call_method":
        if node.target in _MATMUL_METHODS and len(node.args) > 1:
            return node.args[0], node.args[1]
        if node.target in _ADDMM_METHODS and len(node.args) > 2:
            return node.args[1], node.args[2]
    return None


def _is_view(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _VIEW_FNS) or (
        node.op == "call_method" and node.target in _VIEW_METHODS
    )


@dataclasses.dataclass
class _ParamUse:
    """What the Dynamo graph says about one trainable parameter input."""

    index: int
    node: torch.fx.Node
    uses: list[tuple[torch.fx.Node, torch.fx.Node]]  # (matmul node, its input operand)
    features: Optional[int] = None
    reason: str = ""
    hops: set = dataclasses.field(default_factory=set)  # higher-order ops the weight is passed into


def _param_uses(gm: torch.fx.GraphModule, index: int, node: torch.fx.Node) -> _ParamUse:
    """The matmuls a parameter reaches through views, and the contraction size they share."""
    out = _ParamUse(index, node, [])
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            ops = _operands(user)
            hop = ti.higher_order_op_name(user.target) if user.op == "call_function" else None
            if hop is not None:
                out.hops.add(hop)
            if ops is not None:
                inp, weight = ops
                if weight is n and isinstance(inp, torch.fx.Node):
                    out.uses.append((user, inp))
            elif _is_view(user) and user.args and user.args[0] is n:
                stack.append(user)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out.uses.sort(key=lambda u: order[u[0]])
    found = []  # a list: a SymInt is unhashable
    for _, inp in out.uses:
        val = inp.meta.get("example_value")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            out.reason = f"the input of {inp.name} has no known shape"
            return out
        found.append(val.shape[-1])
    if out.hops:  # e.g. torch.utils.checkpoint: the matmul lives in a subgraph this backend does not look into
        out.reason = (
            f"the weight is used inside {', '.join(sorted(out.hops))} (activation checkpointing), whose subgraph "
            "velora_fx does not rewrite; it stays exact (move the checkpoint off this layer to compress it)"
        )
    elif not out.uses:
        out.reason = "the weight reaches no matmul as its right operand (x @ W, F.linear)"
    elif any(ti.is_symbolic(s) for s in found):
        out.reason = "the contraction size is symbolic"
    elif len(sizes := {int(s) for s in found}) > 1:
        out.reason = f"the weight is used with several contraction sizes {sorted(map(int, sizes))}"
    else:
        out.features = int(next(iter(sizes)))
    return out


# -- parameter -> (user model, owner module, name) --------------------------------------


@dataclasses.dataclass(frozen=True)
class _Owner:
    """Where a parameter lives in the user's model."""

    root: nn.Module
    owner: nn.Module
    leaf: str
    fqn: str


def _modules_on_stack(limit: int = 400) -> list[nn.Module]:
    """User modules referenced by the frames calling us: ``torch.compile``'d models first, then outermost first.

    Dynamo runs the backend (and the compiled graph runs) under the frame of
    the module being compiled, so the user's model is on the stack. Dynamo's
    own graph modules are left out.
    """
    compiled, plain = [], []
    optimized = ti.optimized_module_type()
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < limit:
        for value in list(frame.f_locals.values()):
            if isinstance(value, optimized):
                compiled.append(ti.unwrap_optimized_module(value))
            elif isinstance(value, nn.Module) and not isinstance(value, torch.fx.GraphModule):
                if not type(value).__module__.startswith("torch._"):
                    plain.append(value)
        frame = frame.f_back
        depth += 1
    plain.reverse()
    seen, out = set(), []
    for m in compiled + plain:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _find_owners(params: Sequence[torch.Tensor]) -> list[Optional[_Owner]]:
    """The owner of each parameter in the first candidate model that holds it (``None`` if none does)."""
    wanted = {id(p): i for i, p in enumerate(params)}
    found: list[Optional[_Owner]] = [None] * len(params)
    for root in _modules_on_stack():
        if all(f is not None for f in found):
            break
        for prefix, module in root.named_modules(remove_duplicate=True):
            for leaf, p in module._parameters.items():
                i = wanted.get(id(p)) if p is not None else None
                if i is not None and found[i] is None and params[i] is p:
                    found[i] = _Owner(root, module, leaf, f"{prefix}.{leaf}" if prefix else leaf)
    return found


_SOURCE_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]|\.([A-Za-z_][A-Za-z0-9_]*)")


def _source_fqn(source: Any) -> str:
    """A dotted name from a Dynamo source (``L['self']._modules['lin']._parameters['weight']`` -> ``lin.weight``)."""
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    if not isinstance(name, str):
        return str(source)
    parts = [a or b for a, b in _SOURCE_KEY.findall(name)]
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers", "self")]
    return ".".join(parts) or name


# -- compile-time plan store (so an AOTAutograd cache hit still has its report) ---------

_PLANS: dict[str, str] = {}
_PLANS_LOCK = threading.Lock()


def _plan_path(key: str) -> str:
    return os.path.join(ti.cache_dir(), "velora_fx", "plans", f"{key}.json")


def _store_plan(key: str, sites: list[PlannedSite]) -> None:
    text = records_to_json(sites)
    with _PLANS_LOCK:
        _PLANS[key] = text
    try:
        path = _plan_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # the report is a convenience; compiling must not fail for it
        log.debug("velora_fx: could not store the plan %s: %s", key, e)


def _load_plan(key: str) -> Optional[list[PlannedSite]]:
    with _PLANS_LOCK:
        text = _PLANS.get(key)
    if text is None:
        try:
            with open(_plan_path(key)) as f:
                text = f.read()
        except OSError:
            return None
    return records_from_json(text)


def _graph_key(gm: torch.fx.GraphModule, examples: Sequence[Any], uuid: str) -> str:
    h = hashlib.sha256(uuid.encode())
    h.update(gm.code.encode())
    def dims(sizes) -> tuple:  # a symbol's name depends on what was compiled before: only say "symbolic"
        return tuple("sym" if ti.is_symbolic(s) else int(s) for s in sizes)

    for e in examples:
        if isinstance(e, torch.Tensor):
            h.update(f"{dims(e.shape)}|{dims(e.stride())}|{e.dtype}|{e.requires_grad}".encode())
        else:
            h.update(repr(e).encode())
    return h.hexdigest()[:40]


# -- the backend --------------------------------------------------------------------------


class VeloraBackend:
    """A ``torch.compile`` backend: Inductor, plus the VeLoRA joint-graph rewrite. Build it with ``make_backend``."""

    def __init__(self, config: Optional[VeloraConfig] = None):
        if config is not None and not isinstance(config, VeloraConfig):
            raise ValueError(f"velora_fx.make_backend: config must be a VeloraConfig, got {type(config).__name__}")
        self.config = config if config is not None else VeloraConfig()
        self.__name__ = "velora_fx"
        self._graphs = 0

    def __repr__(self) -> str:
        return f"velora_fx.make_backend({self.config!r})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        unknown = set(kwargs) - {"mode", "options"}
        if unknown:
            raise ValueError(f"velora_fx backend: unexpected arguments {sorted(unknown)}; it takes mode= and options=")
        patches = ti.mode_config_patches(kwargs.get("mode"), kwargs.get("options"))
        if not torch.is_grad_enabled():
            # no joint graph will be built: exactly what the default backend does
            return ti.compile_fx(gm, example_inputs, patches)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        params = []
        for i, node in enumerate(placeholders):
            real = ti.placeholder_example(node)
            if isinstance(real, nn.Parameter) and real.requires_grad:
                params.append((i, node, real))
        if not params:
            return ti.compile_fx(gm, example_inputs, patches)
        return self._compile(gm, example_inputs, patches, placeholders, params)

    def _compile(self, gm, example_inputs, patches, placeholders, params) -> Callable:
        cfg = self.config
        self._graphs += 1
        name = f"graph {gm.meta.get('dynamo_compile_id', self._graphs)}"
        owners = _find_owners([p for _, _, p in params])
        uses = [_param_uses(gm, i, node) for i, node, _ in params]
        slots: list[ParamSlot] = []
        new_inputs: list[tuple[str, torch.Tensor]] = []
        refreshed = cfg.init in ("batch_average", "ema")
        if refreshed and _distributed():
            raise ValueError(
                f"velora_fx: init={cfg.init!r} recomputes v from each rank's own batch inside the compiled graph, so "
                "the ranks of this torch.distributed job would train with different v; use init='batch_average_once' "
                "(calibrated once from the global first batch) or init='random' (seeded, the same on every rank)"
            )
        n_in = len(placeholders)
        leaders: dict[tuple[str, ...], ParamSlot] = {}  # see NOTE [one v per input]
        for (i, node, param), owner, use in zip(params, owners, uses):
            fqn = owner.fqn if owner is not None else _source_fqn(ti.placeholder_source(node))
            reason = cfg.why_excluded(fqn) or use.reason
            d = cfg.sub_token_size_for(use.features) if use.features is not None else None
            if not reason and use.features is not None:
                reason = cfg.why_not_splittable(use.features) or ""  # too small, or d = 1 (p as large as X)
            if reason:
                slots.append(ParamSlot(primal=i, fqn=fqn, reason=reason, features=use.features))
                continue
            key = tuple(sorted({inp.name for _, inp in use.uses}))
            leader = leaders.get(key) if cfg.init != "random" else None
            if leader is not None and leader.sub_token_size == d:
                slots.append(ParamSlot(i, fqn, leader.v_primal, use.features, d, refreshed, shares=leader.fqn))
                continue
            v_index = n_in + len(new_inputs)
            new_inputs.append((f"velora_v_{len(new_inputs)}", torch.zeros(d, dtype=torch.float32, device=param.device)))
            slots.append(ParamSlot(i, fqn, v_index, use.features, d, refreshed))
            leaders.setdefault(key, slots[-1])
        new_gm, v_nodes, new_examples = ti.copy_graph_module_with_inputs(gm, new_inputs, example_inputs)
        n_refresh = _insert_refresh(new_gm, slots, uses, v_nodes, cfg) if refreshed else 0
        spec = GraphSpec(name, n_in + len(new_inputs), tuple(slots))
        joint_pass = VeloraJointPass(spec, cfg)
        key = _graph_key(new_gm, new_examples, joint_pass.uuid())
        with ti.inductor_patch(joint_custom_pre_pass=joint_pass):
            compiled = ti.compile_fx(new_gm, new_examples, patches)
        sites = joint_pass.records
        if sites is None:  # a compile-cache hit: the pass did not run; its plan was stored when it did
            sites = _load_plan(key)
            if sites is not None:  # stored by an earlier compile, perhaps under another graph id
                sites = [dataclasses.replace(s, record=dataclasses.replace(s.record, graph=name)) for s in sites]
            else:  # rare (a cache written before the plan store was): compile once more, caches off
                log.info("velora_fx: %s came from the compile cache without its plan; recompiling it", name)
                joint_pass = VeloraJointPass(spec, cfg)
                with ti.inductor_patch(joint_custom_pre_pass=joint_pass), ti.compile_caches(False):
                    compiled = ti.compile_fx(new_gm, new_examples, patches)
                sites = joint_pass.records
        if joint_pass.records is not None:
            _store_plan(key, sites)
        if joint_pass.graph_dump is not None and _debug_enabled():
            log.log(
                logging.WARNING if os.environ.get(_DEBUG_ENV) else logging.DEBUG,
                "velora_fx: rewritten joint graph of %s:\n%s",
                name,
                joint_pass.graph_dump,
            )
        wrapper = _VeloraCompiledGraph(compiled, gm, spec, uses, sites, n_refresh, cfg)
        wrapper.bind_owners({i: o for (i, _, _), o in zip(params, owners)})
        return wrapper

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()``; nothing to drop (``v`` lives on the models)."""


# NOTE [one v per input]
# Weights that read the same input (q/k/v of one attention, gate/up of one
# SwiGLU) calibrate the same v under every init but "random": v is the
# normalised mean sub-token of that input, and batch_average / ema refresh it
# from that input too. So they use one v (the first weight's: the others'
# ParamSlot.shares names it), and the joint-graph pass keeps one p for all of
# them instead of one per weight: for q/k/v, a third of the bytes of p and of
# the projection work. Each weight still has its `<param>_velora_v` buffer in
# the state_dict: the followers' buffers are the leader's tensor (the same
# storage, saved once by torch.save), so the dW of every weight is the VeLoRA
# formula with its own buffer. A checkpoint whose followers hold a different v
# than their leader (written by other code) is warned about, and the leader's
# v is used. init="random" seeds v per weight name: nothing is shared.


def _insert_refresh(gm, slots, uses, v_nodes, cfg) -> int:
    """Under ``batch_average`` / ``ema``: compute this step's ``v`` in the graph, marked, and return it too."""
    by_name = {n.name: n for n in gm.graph.nodes}
    use_of = {u.index: u for u in uses}
    output = gm.graph.output_node()
    extra = []
    decay = cfg.ema_decay if cfg.init == "ema" else None
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    k = 0
    for slot in slots:
        if slot.v_primal is None or slot.shares:
            continue
        v_node = v_nodes[k]
        k += 1
        # before the first matmul of this weight and of those sharing its v (NOTE [one v per input]): one input
        group = [use_of[s.primal].uses[0] for s in slots if s.primal == slot.primal or s.shares == slot.fqn]
        first, inp = min(group, key=lambda u: order[u[0].name])
        with gm.graph.inserting_before(by_name[first.name]):
            v_t = gm.graph.call_function(refreshed_direction, (v_node, by_name[inp.name], decay))
            marked = gm.graph.call_function(DIRECTION_OP, (v_t, slot.v_primal))
        extra.append(marked)
    outs = output.args[0]
    output.args = (tuple(outs) + tuple(extra),) if isinstance(outs, (tuple, list)) else ((outs, *extra),)
    gm.recompile()
    return len(extra)


# -- what runs at training time -----------------------------------------------------------


def _rename(text: str, renames: Sequence[tuple[str, str]]) -> str:
    """``text`` with whole parameter names replaced (``a.weight`` does not match inside ``aa.weight``)."""
    for old, new in renames:
        text = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w.])", new, text)
    return text


def _takes_varargs(fn: Callable) -> bool:
    """Whether ``fn`` takes its inputs as ``*args`` (else: one boxed list)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


class _Binding:
    """One parameter object bound to its ``v``: the buffer on its owner module (or a private tensor)."""

    __slots__ = ("param", "owner", "name", "private", "ready", "fqn")

    def __init__(self, param, owner: Optional[_Owner], name: str, private: Optional[torch.Tensor], fqn: str):
        self.param = weakref.ref(param)
        self.owner = owner.owner if owner is not None else None
        self.name, self.private, self.ready, self.fqn = name, private, False, fqn

    def v(self) -> torch.Tensor:
        return self.owner._buffers[self.name] if self.owner is not None else self.private


def _alias_follower(owner: _Owner, leader: _Binding) -> None:
    """Make the ``v`` buffer of a weight reading the same input as ``leader``'s weight the leader's tensor
    (NOTE [one v per input])."""
    name, v = f"{owner.leaf}{V_SUFFIX}", leader.v()
    existing = owner.owner._buffers.get(name)
    if existing is v:
        return
    if existing is not None and (existing.shape != v.shape or not torch.equal(existing.to(v.device), v)):
        log.warning(
            "velora_fx: %s%s differs from %s%s, whose input it shares; both weights use the latter (one v per input)",
            owner.fqn,
            V_SUFFIX,
            leader.fqn,
            V_SUFFIX,
        )
    if existing is None:
        owner.owner.register_buffer(name, v, persistent=True)
    else:
        owner.owner._buffers[name] = v


class _VeloraCompiledGraph:
    """Inductor's compiled graph plus the runtime inputs ``v``.

    Keeps the calling convention of what ``compile_fx`` returned: Dynamo calls
    it with the graph inputs as positional arguments, yet it carries
    ``_boxed_call=True`` (copied from AOTAutograd's boxed runtime wrapper); a
    caller that trusts the attribute passes one list. Both are accepted here,
    and the inner callable is called the way its signature takes.
    """

    def __init__(self, compiled, dynamo_gm, spec: GraphSpec, uses, sites, n_refresh, cfg: VeloraConfig):
        self.compiled = compiled
        if hasattr(compiled, "_boxed_call"):
            self._boxed_call = compiled._boxed_call
        self._inner_takes_list = not _takes_varargs(compiled)
        self.dynamo_gm = dynamo_gm
        self.spec = spec
        self.cfg = cfg
        self.sites: Optional[list[PlannedSite]] = sites
        self.n_refresh = n_refresh
        self.v_slots = [k for k, s in enumerate(spec.slots) if s.v_primal is not None and not s.shares]
        by_fqn = {s.fqn: k for k, s in enumerate(spec.slots)}
        self.followers: dict[int, list[int]] = {k: [] for k in self.v_slots}
        for f, s in enumerate(spec.slots):
            if s.shares:
                self.followers[by_fqn[s.shares]].append(f)
        used = None if sites is None else {s.slot for s in sites if s.record.status == COMPRESSED}
        self.used = [used is None or any(j in used for j in (k, *self.followers[k])) for k in self.v_slots]
        self.uses = {u.index: u for u in uses}
        self.bindings: dict[int, _Binding] = {}
        self.dummies: dict[int, torch.Tensor] = {}
        # per user model: one slot -> parameter-name map per instance using this graph
        self.roots: dict[int, tuple[weakref.ref, list[dict[int, str]]]] = {}
        self.instances: dict[int, weakref.ref] = {}

    # -- naming the slots in the user's models (for velora_fx.report) -------------------------

    def bind_owners(self, owners: dict[int, Optional[_Owner]]) -> None:
        """Name the slots after the parameters the graph was compiled with."""
        self._add_instance([owners.get(s.primal) for s in self.spec.slots])

    def _add_instance(self, owners: Sequence[Optional[_Owner]]) -> None:
        """Record one instance (one set of parameters) of this graph in the user models owning them."""
        by_root: dict[int, tuple[nn.Module, dict[int, str]]] = {}
        for k, owner in enumerate(owners):
            if owner is not None:
                by_root.setdefault(id(owner.root), (owner.root, {}))[1][k] = owner.fqn
        for root, names in by_root.values():
            entry = self.roots.get(id(root))
            if entry is None or entry[0]() is not root:
                entry = (weakref.ref(root), [])
                self.roots[id(root)] = entry
                attach_records(root, self._provider(entry))
            if names not in entry[1]:
                entry[1].append(names)

    def _note_instance(self, args: list) -> None:
        """Name the slots after this call's parameters when they are a model instance not seen yet."""
        if not self.spec.slots:
            return
        first = args[self.spec.slots[0].primal]
        seen = self.instances.get(id(first))
        if seen is None or seen() is not first:
            self.instances[id(first)] = weakref.ref(first)
            self._add_instance(_find_owners([args[s.primal] for s in self.spec.slots]))

    def _provider(self, entry):
        def records() -> list[SiteRecord]:
            out = []
            for names in entry[1]:
                renames = [(self.spec.slots[k].fqn, n) for k, n in names.items() if n != self.spec.slots[k].fqn]
                for s in self.sites or ():
                    rec = s.record
                    if renames:
                        rec = dataclasses.replace(rec, weight=names.get(s.slot, rec.weight), reason=_rename(rec.reason, renames))
                    out.append(rec)
            return out

        return records

    def _bind(self, args: list, k: int) -> _Binding:
        slot = self.spec.slots[k]
        param = args[slot.primal]
        owner, *follower_owners = _find_owners([param, *(args[self.spec.slots[f].primal] for f in self.followers[k])])
        name = f"{owner.leaf}{V_SUFFIX}" if owner is not None else ""
        fqn = owner.fqn if owner is not None else slot.fqn
        private = None
        if owner is not None:
            existing = owner.owner._buffers.get(name)
            if existing is None:
                v = self._new_v(slot, fqn, param.device)
                owner.owner.register_buffer(name, v, persistent=True)
            elif existing.shape != (slot.sub_token_size,):
                raise ValueError(
                    f"velora_fx: buffer {fqn}{V_SUFFIX} has shape {tuple(existing.shape)} but this backend's config "
                    f"needs ({slot.sub_token_size},) for D={slot.features}; compile with the config the model "
                    "was trained with, or delete the buffer to recalibrate"
                )
        else:
            log.warning(
                "velora_fx: %s is not reachable from a module on the call stack; its v is kept outside any "
                "state_dict",
                slot.fqn,
            )
            private = self._new_v(slot, fqn, param.device)
        binding = _Binding(param, owner, name, private, fqn)
        self.bindings[id(param)] = binding
        if owner is not None:
            for follower in follower_owners:
                if follower is not None:
                    _alias_follower(follower, binding)
        return binding
    def _new_v(self, slot: ParamSlot, fqn: str, device) -> torch.Tensor:
        if self.cfg.init == "random":
            return random_direction(slot.sub_token_size, self.cfg.seed, fqn).to(device)
        return torch.zeros(slot.sub_token_size, dtype=torch.float32, device=device)

    # -- calibration ---------------------------------------------------------------------

    def _calibrate(self, args: list, todo: list[tuple[int, _Binding]]) -> None:
        """Set each uncalibrated ``v`` from this batch: run the Dynamo graph eagerly, capture each site's input."""
        watch: dict[torch.fx.Node, list[int]] = {}
        for k, _ in todo:
            for matmul, inp in self.uses[self.spec.slots[k].primal].uses:
                watch.setdefault(matmul, []).append(k)
        captured: dict[int, list[torch.Tensor]] = {k: [] for k, _ in todo}
        uses = self.uses
        spec = self.spec

        class Capture(torch.fx.Interpreter):
            def run_node(self, n):
                if n in watch:
                    for k in watch[n]:
                        for matmul, inp in uses[spec.slots[k].primal].uses:
                            if matmul is n:
                                captured[k].append(self.env[inp].detach())
                return super().run_node(n)

        inputs = [a.clone() if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) else a for a in args]
        devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"]
        with torch.no_grad(), torch.random.fork_rng(devices=list({d for d in devices})):
            Capture(self.dynamo_gm).run(*inputs)
        del inputs
        batches = []
        for k, binding in todo:
            xs = [x.reshape(-1, self.spec.slots[k].features) for x in captured[k]]
            batches.append(None if not xs else xs[0] if len(xs) == 1 else torch.cat(xs))
        if _distributed():  # see NOTE [one v on every rank]
            means = _global_sub_token_means(
                [(self.spec.slots[k].sub_token_size, x) for (k, _), x in zip(todo, batches)], todo[0][1].v().device
            )
        for i, ((k, binding), x) in enumerate(zip(todo, batches)):
            slot = self.spec.slots[k]
            if _distributed():
                mean, count = means[i]
                if count == 0:
                    continue  # no tokens on any rank: nothing to average; stays uncalibrated
                new = direction_from_mean(mean, binding.fqn)
            elif x is None or x.shape[0] == 0:
                continue  # no tokens (an empty batch): nothing to average; stays uncalibrated (its dW is 0: exact)
            else:
                new = initial_direction(x, slot.sub_token_size, binding.fqn)
            v = binding.v()
            with torch.no_grad():
                v.copy_(new.to(v.device, v.dtype))
            binding.ready = True
            log.info("velora_fx: calibrated v of %s on the first batch", binding.fqn)

    # -- the call ------------------------------------------------------------------------

    def __call__(self, *call_args: Any) -> Any:
        if len(call_args) == 1 and type(call_args[0]) is list:
            args = call_args[0]  # boxed: the callee frees the inputs by clearing the list
        else:
            args = list(call_args)
        if any(ti.is_fake(a) for a in args):
            return self._call_fake(args)
        self._note_instance(args)
        vs = []
        todo = []
        for k, used in zip(self.v_slots, self.used):
            slot = self.spec.slots[k]
            if not used:
                dummy = self.dummies.get(k)
                if dummy is None:
                    dummy = self.dummies[k] = torch.zeros(slot.sub_token_size, device=args[slot.primal].device)
                vs.append(dummy)
                continue
            param = args[slot.primal]
            binding = self.bindings.get(id(param))
            if binding is None or binding.param() is not param:
                binding = self._bind(args, k)
            v = binding.v()
            if not binding.ready:
                if self.cfg.init != "random" and not bool(v.any()):
                    todo.append((k, binding))
                else:
                    binding.ready = True
            vs.append(v)
        if todo:
            self._calibrate(args, todo)
        args.extend(vs)
        if self._inner_takes_list:
            outs = self.compiled(args)
        else:
            full = tuple(args)
            args.clear()
            outs = self.compiled(*full)
            del full
        if self.n_refresh:
            outs = list(outs)
            new_vs = outs[len(outs) - self.n_refresh :]
            del outs[len(outs) - self.n_refresh :]
            with torch.no_grad():
                for v, new in zip(vs, new_vs):
                    v.copy_(new)
        return outs

    def _call_fake(self, args: list) -> Any:
        """A call on fake inputs while compiling (DDPOptimizer runs each compiled split): shapes only, no ``v`` bound."""
        for k in self.v_slots:
            slot = self.spec.slots[k]
            args.append(torch.zeros(slot.sub_token_size, device=args[slot.primal].device))
        outs = self.compiled(args) if self._inner_takes_list else self.compiled(*args)
        if self.n_refresh:
            outs = list(outs)[: len(outs) - self.n_refresh]
        return outs


# -- torch.distributed: one v on every rank ------------------------------------------------
#
# NOTE [one v on every rank]
# Under data parallelism (DDP, FSDP) every rank must project with the same v,
# or the all-reduced weight gradient mixes different subspaces. When
# torch.distributed is initialised with more than one rank, calibration uses
# the *global* first batch: each rank turns the sub-token mean of its own
# inputs back into a sum (float64) with its count, one all_reduce over the
# default process group adds them up, and every rank normalises the same
# mean (NaN/inf on any rank raises on every rank); so v is what one
# process would compute on the concatenation of all ranks' first batches (up
# to float rounding). There is one all_reduce per calibrating graph call, and
# it happens on every rank that calls the graph for the first time with
# uncalibrated buffers: all ranks must start from the same state (all fresh,
# or all loaded from one checkpoint) and run the same graphs in the same
# order, which data parallelism does anyway. The refreshing modes
# (batch_average, ema) are refused under torch.distributed: they recompute v
# from each rank's own batch inside the compiled graph.


def _distributed() -> bool:
    """Whether this process is one of several ranks of an initialised ``torch.distributed`` job."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_sub_token_means(batches: list[tuple[int, Optional[torch.Tensor]]], device) -> list[tuple[torch.Tensor, int]]:
    """Per ``(d, x)``: the mean sub-token over all ranks and its count, with one ``all_reduce``."""
    sizes = [d for d, _ in batches]
    total = sum(sizes)
    packed = torch.zeros(total + len(batches), dtype=torch.float64, device=device)
    offset = 0
    for i, (d, x) in enumerate(batches):
        if x is not None and x.shape[0]:
            count = x.shape[0] * (-(-x.shape[-1] // d))
            packed[offset : offset + d] = sub_token_mean(x, d).to(device, torch.float64) * count
            packed[total + i] = count
        offset += d
    torch.distributed.all_reduce(packed)
    out, offset = [], 0
    for i, d in enumerate(sizes):
        count = int(packed[total + i])
        out.append(((packed[offset : offset + d] / max(count, 1)).float(), count))
        offset += d
    return out


# -- public -------------------------------------------------------------------------------


def make_backend(config: Optional[VeloraConfig] = None) -> VeloraBackend:
    """A ``torch.compile`` backend that keeps VeLoRA projections instead of linear-layer inputs for ``dW``.

    Inductor compiles both halves as usual; one more joint-graph pass
    (``velora_fx.passes.joint_graph``, applied before the min-cut
    partitioner) rewrites every weight-gradient matmul whose stored input
    can be served from its projection ``p``. ``mode=`` and ``options=`` of
    ``torch.compile`` are honoured as the built-in Inductor backend does;
    graphs compiled without grad (``no_grad``, inference) are exactly the
    default backend's.

    Each compressed weight has one direction ``v``, a persistent float32
    buffer ``<param_leaf>_velora_v`` on the module owning the parameter (so
    ``state_dict()`` / ``load_state_dict()`` carry it). It is calibrated from
    the first training batch (the normalised mean sub-token of the weight's
    input, computed on the first call of the compiled graph), unless the
    buffer is already non-zero (a loaded checkpoint).

    Under ``torch.distributed`` (initialised, more than one rank: DDP,
    FSDP2) every rank gets the same ``v``: it is calibrated from the *global*
    first batch, the sub-token sums and counts of all ranks all-reduced over
    the default process group, then normalised (one ``all_reduce`` per
    calibrating graph; all ranks must start from the same buffers: all fresh,
    or all loaded from one checkpoint). ``init="batch_average"`` / ``"ema"``
    are refused there with a ``ValueError`` (they would refresh ``v`` per rank).

    ``init="random"`` needs no batch; ``"batch_average"`` / ``"ema"``
    recompute ``v`` inside the compiled forward on every step (no
    recompilation) and write it back.

    A weight used at several places (tied weights) has one ``v``, shared by
    all its uses, calibrated from all its inputs in the graph that runs first
    (under ``batch_average`` / ``ema``, refreshed from its first use). A
    buffer must be created (by a first compiled call) before
    ``load_state_dict`` can fill it: call the compiled model once, or load
    with ``strict=False`` after compiling.

    Args:
        config: what to compress and how; ``VeloraConfig()`` when omitted.

    Returns:
        A callable to pass as ``torch.compile(..., backend=...)``.

    Example::

        >>> cfg = velora_fx.VeloraConfig(num_groups=32, include=("*.down_proj.weight",))
        >>> model = torch.compile(model, backend=velora_fx.make_backend(cfg))   # doctest: +SKIP
        >>> model(x).sum().backward()                                           # doctest: +SKIP
        >>> print(velora_fx.report(model))                                      # doctest: +SKIP
    """
    return VeloraBackend(config)


def load_state_dict(model: nn.Module, state_dict: dict[str, Any], strict: bool = True):
    """``model.load_state_dict(state_dict)`` for a model trained with the backend, before its first compiled call.

    The ``<param>_velora_v`` buffers appear on a model the first time its
    compiled graph runs with grad; a fresh model does not have them yet, so a
    plain strict ``load_state_dict`` rejects them (and ``strict=False`` would
    drop them, recalibrating ``v`` on the next batch: the resumed run would
    differ). This registers the missing buffers first; the backend then
    uses the loaded directions as they are.

    Args:
        model: the model, or what ``torch.compile`` returned for it.
        state_dict: as saved from ``model.state_dict()``.
        strict: as for ``nn.Module.load_state_dict``.

    Returns:
        What ``nn.Module.load_state_dict`` returns.

    Example::

        >>> model = torch.compile(MyModel(), backend=velora_fx.backend)           # doctest: +SKIP
        >>> velora_fx.load_state_dict(model, torch.load("ckpt.pt")["model"])      # doctest: +SKIP
    """
    root = ti.unwrap_optimized_module(model)
    for key, value in state_dict.items():
        if not key.endswith(V_SUFFIX):
            continue
        owner_name, _, leaf = key.rpartition(".")
        try:
            owner = root.get_submodule(owner_name)
        except AttributeError:
            continue  # strict loading reports the unexpected key
        if leaf not in owner._buffers:
            owner.register_buffer(leaf, torch.zeros_like(value), persistent=True)
    return root.load_state_dict(state_dict, strict=strict)


#: ``torch.compile(model, backend=velora_fx.backend)``: the backend with ``VeloraConfig()`` defaults.
backend = make_backend()
