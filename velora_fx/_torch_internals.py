"""Every private torch API velora_fx touches, in one place.

A torch upgrade that moves one of these breaks this file only. Tested on
torch 2.13 (see ``pyproject.toml`` for the range claimed). Nothing here knows
about VeLoRA: these are thin, named wrappers over compiler internals.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

__all__ = [
    "CustomGraphPass",
    "compile_fx",
    "inductor_patch",
    "mode_config_patches",
    "hash_files",
    "placeholder_source",
    "placeholder_example",
    "copy_graph_module_with_inputs",
    "detect_fake_mode",
    "size_hint",
    "is_symbolic",
    "higher_order_op_name",
    "is_fake",
    "optimized_module_type",
    "unwrap_optimized_module",
    "COMPILED_SEGMENT",
    "cache_dir",
    "stable_topological_sort",
    "compile_caches",
    "compile_caches_enabled",
    "JointLayout",
    "joint_layout",
    "snapshot_graph",
    "restore_graph",
    "memory_budget_patch",
    "with_custom_passes",
    "saved_for_backward",
    "input_positions",
    "is_tangent",
    "c_linear",
    "trace_into",
    "trace_shared",
    "is_shared_subgraph",
    "lower_as_buffer",
    "lower_indexed",
]

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files  # noqa: E402


def compile_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config_patches: dict[str, Any]) -> Callable:
    """Inductor's ``compile_fx``: what ``torch.compile(backend="inductor")`` runs; keeps ``_boxed_call``."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches or None)


def lower_as_buffer(op: Any) -> None:
    """Have Inductor lower ``op``, an identity custom op of one tensor, by *realizing* its input: computed once
    into a buffer of its own that the kernels reading it load, rather than inlined into each of them (Inductor's
    choice for a cheap pointwise value, made by op count)."""
    from torch._inductor.lowering import lowerings, register_lowering

    def realized(x):
        x.realize()
        return x

    if op not in lowerings:
        register_lowering(op, type_promotion_kind=None)(realized)


class _IntValue:
    """An integer value inside an Inductor kernel with Python's integer operators (``^ & | << >> *``; an ``int``
    operand becomes a constant of the value's dtype), so that one function computes on tensors in eager and on
    these values in a kernel. Each operator is one op of the kernel's body: a value used twice is computed once
    (an expression of separate pointwise nodes is inlined into each of its uses, so that a chain of
    ``h ^ (h >> s)`` doubles the ops Inductor generates at every step)."""

    __slots__ = ("value", "dtype")

    def __init__(self, value: Any, dtype: torch.dtype):
        self.value, self.dtype = value, dtype

    def _binary(self, name: str, other: Any) -> "_IntValue":
        from torch._inductor.virtualized import ops

        rhs = other.value if isinstance(other, _IntValue) else ops.constant(other, self.dtype)
        return _IntValue(getattr(ops, name)(self.value, rhs), self.dtype)

    def __xor__(self, other: Any) -> "_IntValue":
        return self._binary("bitwise_xor", other)

    def __and__(self, other: Any) -> "_IntValue":
        return self._binary("bitwise_and", other)

    def __or__(self, other: Any) -> "_IntValue":
        return self._binary("bitwise_or", other)

    def __lshift__(self, other: Any) -> "_IntValue":
        return self._binary("bitwise_left_shift", other)

    def __rshift__(self, other: Any) -> "_IntValue":
        return self._binary("bitwise_right_shift", other)

    def __mul__(self, other: Any) -> "_IntValue":
        return self._binary("mul", other)


def lower_indexed(op: Any, fn: Callable[..., Any]) -> None:
    """Have Inductor lower ``op(scalar, shape, *args) -> int64 tensor of shape`` (``scalar`` a ``(1,)`` tensor
    holding an integer) as one pointwise computation, ``fn(i, s, shape, wide, *args)`` per element: ``i`` its
    row-major flat index and ``s`` the scalar, both int64 values taking Python's integer operators (``_IntValue``),
    ``wide`` whether an index may reach ``2**32``. ``fn`` is the function the op's eager implementation runs on
    tensors: the same integers on every backend, each of its intermediates computed once in the kernel's body."""
    import sympy
    from torch._inductor.ir import FlexibleLayout, Pointwise
    from torch._inductor.lowering import lowerings, register_lowering
    from torch._inductor.virtualized import ops

    def lowering(scalar, shape, *args):
        ranges = list(shape)
        strides = FlexibleLayout.contiguous_strides(ranges)
        numel = sympy.Mul(*ranges)
        wide = not (numel.is_number and int(numel) <= 0xFFFFFFFF)
        load = scalar.make_loader()

        def inner_fn(index):
            flat = sympy.Add(*[i * s for i, s in zip(index, strides)])
            i = _IntValue(ops.index_expr(flat, torch.int64), torch.int64)
            s = _IntValue(ops.to_dtype(load([sympy.Integer(0)]), torch.int64), torch.int64)
            return fn(i, s, ranges, wide, *args).value

        return Pointwise.create(device=scalar.get_device(), dtype=torch.int64, inner_fn=inner_fn, ranges=ranges)

    if op not in lowerings:
        register_lowering(op, type_promotion_kind=None)(lowering)


@contextlib.contextmanager
def inductor_patch(**patches: Any) -> Iterator[None]:
    """``torch._inductor.config.patch`` (e.g. ``joint_custom_pre_pass=...``) for the duration of a compile."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(**patches):
        yield


def mode_config_patches(mode: Optional[str], options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Inductor config patches for ``torch.compile(mode=..., options=...)``, as the built-in backend derives them."""
    if not mode and not options:
        return {}
    wrapper = torch._TorchCompileInductorWrapper(mode, options, None)  # type: ignore[attr-defined]
    return dict(wrapper.config)


def hash_files(paths: Iterable[str], extra: str = "") -> str:
    """Hex digest of the contents of ``paths`` and ``extra`` (Inductor's helper for custom-pass ``uuid()``)."""
    return get_hash_for_files(tuple(paths), extra).hex()


def placeholder_source(node: torch.fx.Node) -> Any:
    """Dynamo's ``Source`` of a placeholder of a Dynamo graph (``None`` when it has none)."""
    source = getattr(node, "_dynamo_source", None)
    if source is None:
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
    return source


def placeholder_example(node: torch.fx.Node) -> Any:
    """The real value Dynamo traced a placeholder with (the ``nn.Parameter`` itself for a lifted parameter)."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    try:
        return grapharg.example
    except Exception:  # a freed weak example: no longer resolvable
        return None


def detect_fake_mode(values: Sequence[Any]) -> Any:
    """The ``FakeTensorMode`` the fake ``values`` belong to (``None`` if there is none)."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(values)


def copy_graph_module_with_inputs(
    gm: torch.fx.GraphModule,
    new_inputs: Sequence[tuple[str, torch.Tensor]],
    example_inputs: Sequence[Any],
) -> tuple[torch.fx.GraphModule, list[torch.fx.Node], list[Any]]:
    """A copy of Dynamo's ``gm`` with one extra placeholder per ``(name, real tensor)``, appended last.

    Dynamo's own ``gm`` is never touched (placeholders added in place give
    ``KeyError: grapharg``; buffers registered on it give ``... not found in
    param_name_to_source``): the copy carries ``meta``,
    ``_param_name_to_source`` and every placeholder's ``_dynamo_source`` over,
    and the new placeholders get a static-shape fake value (a fake value with
    fresh shape symbols has no source, and guarding on it fails in
    ``symbolic_shapes.issue_guard`` with an ``IndexError``).

    Returns the copy, its new placeholder nodes, and the extended example inputs.
    """
    graph = copy.deepcopy(gm.graph)
    new_gm = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source  # type: ignore[attr-defined]
    old_placeholders = list(gm.graph.find_nodes(op="placeholder"))
    new_placeholders_old = list(new_gm.graph.find_nodes(op="placeholder"))
    for old, new in zip(old_placeholders, new_placeholders_old):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
        new.meta = dict(old.meta)
    fake_mode = detect_fake_mode(list(example_inputs))
    added: list[torch.fx.Node] = []
    extra_examples: list[Any] = []
    anchor = new_placeholders_old[-1] if new_placeholders_old else None
    for name, tensor in new_inputs:
        ctx = new_gm.graph.inserting_after(anchor) if anchor is not None else new_gm.graph.inserting_before(None)
        with ctx:
            node = new_gm.graph.placeholder(name)
        node._dynamo_source = None  # type: ignore[attr-defined]
        fake = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor
        node.meta["example_value"] = fake
        node.meta["val"] = fake
        added.append(node)
        extra_examples.append(fake)
        anchor = node
    new_gm.recompile()
    return new_gm, added, list(example_inputs) + extra_examples


def size_hint(value: Any) -> int:
    """A concrete int for a (possibly symbolic) size: the example value Dynamo traced with, for a ``SymInt``."""
    if isinstance(value, torch.SymInt):
        try:
            from torch.fx.experimental.symbolic_shapes import optimization_hint
        except ImportError:  # torch 2.11
            from torch.fx.experimental.symbolic_shapes import size_hint as optimization_hint

        return int(optimization_hint(value))
    return int(value)


def is_symbolic(value: Any) -> bool:
    """Whether ``value`` is a ``SymInt`` that is not a known constant (nor specialised to one by a guard)."""
    return isinstance(value, torch.SymInt) and value.node.maybe_as_int() is None


def higher_order_op_name(target: Any) -> Optional[str]:
    """The name of a higher-order operator (``tag_activation_checkpoint``, ...), ``None`` for anything else."""
    from torch._ops import HigherOrderOperator

    return target.name() if isinstance(target, HigherOrderOperator) else None


def is_fake(value: Any) -> bool:
    """Whether ``value`` is a ``FakeTensor`` (a compiled graph called during compilation, e.g. by DDPOptimizer)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def optimized_module_type() -> type:
    """The class of what ``torch.compile(module)`` returns."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


#: the attribute under which ``torch.compile(module)`` keeps the module: a segment of the names it gives
COMPILED_SEGMENT = "_orig_mod"


def unwrap_optimized_module(obj: Any) -> Any:
    """The user's module behind ``torch.compile(module)``; ``obj`` itself otherwise."""
    return getattr(obj, COMPILED_SEGMENT, obj) if isinstance(obj, optimized_module_type()) else obj


def cache_dir() -> str:
    """Inductor's on-disk cache directory (where its FX and AOTAutograd caches live)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as _cache_dir

    return _cache_dir()


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Inductor's order-preserving topological sort."""
    from torch._inductor.pattern_matcher import stable_topological_sort as _sort

    _sort(graph)


@contextlib.contextmanager
def compile_caches(enabled: bool) -> Iterator[None]:
    """Turn Inductor's FX graph cache and the AOTAutograd cache off (``False``), or leave them as they are
    (``True``, torch's default: on) — never on against a user's choice."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if enabled:
        yield
        return
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def compile_caches_enabled() -> bool:
    """Whether Inductor's FX graph cache or the AOTAutograd cache is on."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return bool(inductor_config.fx_graph_cache or functorch_config.enable_autograd_cache)


# -- the joint graph, as AOTAutograd describes it -------------------------------------------------------


@dataclasses.dataclass
class JointLayout:
    """Which placeholders of a joint graph are the inputs, and which outputs are their gradients.

    Read from the descriptors AOTAutograd puts on the placeholders and the
    output (``node.meta["desc"]``), never inferred from names or positions.
    """

    input_index: dict[torch.fx.Node, int]  # placeholder -> position among the compiled graph's inputs
    grad_of_input: dict[int, Optional[torch.fx.Node]]  # input position -> its gradient output (None: no gradient)
    input_of_grad_output: dict[int, int]  # output position -> the input it is the gradient of
    forward_outputs: list[Any]  # the outputs that are not gradients


def joint_layout(graph: torch.fx.Graph) -> JointLayout:
    """The ``JointLayout`` of AOTAutograd's joint graph; ``ValueError`` when its descriptors are missing."""
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput, TangentAOTInput

    input_index: dict[torch.fx.Node, int] = {}
    for node in graph.find_nodes(op="placeholder"):
        desc = node.meta.get("desc")
        if desc is None:
            raise ValueError(f"the joint graph input {node.name} has no AOTAutograd descriptor")
        if isinstance(desc, PlainAOTInput):
            input_index[node] = desc.idx
        elif not isinstance(desc, TangentAOTInput):
            raise ValueError(f"the joint graph input {node.name} is {desc}, not a plain input or a tangent")
    output = graph.output_node()
    descs = output.meta.get("desc")
    outs = list(output.args[0])
    if descs is None or len(descs) != len(outs):
        raise ValueError("the joint graph output has no AOTAutograd descriptors")
    layout = JointLayout(input_index, {}, {}, [])
    for i, (value, desc) in enumerate(zip(outs, descs)):
        if isinstance(desc, GradAOTOutput):
            if not isinstance(desc.grad_of, PlainAOTInput):
                raise ValueError(f"output {i} is the gradient of {desc.grad_of}, not of a plain input")
            layout.grad_of_input[desc.grad_of.idx] = value
            layout.input_of_grad_output[i] = desc.grad_of.idx
        elif desc is not None:
            layout.forward_outputs.append(value)
    return layout


def snapshot_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` (nodes and their ``meta``, shallowly) that ``restore_graph`` can put back."""
    copy_ = torch.fx.Graph()
    copy_.output(copy_.graph_copy(graph, {})).meta = dict(graph.output_node().meta)
    return copy_


def restore_graph(graph: torch.fx.Graph, snapshot: torch.fx.Graph) -> None:
    """Make ``graph`` (in place: the object Inductor holds) the graph ``snapshot`` was taken of."""
    for node in reversed(list(graph.nodes)):  # users before what they use
        graph.erase_node(node)
    graph._graph_namespace = torch.fx.graph._Namespace()  # the erased names are free again: the copies take them
    graph.output(graph.graph_copy(snapshot, {})).meta = dict(snapshot.output_node().meta)


def with_custom_passes(**ours: Any) -> dict[str, Any]:
    """Inductor config patches that run each of ``ours`` first among the custom passes of its slot
    (``joint_custom_pre_pass=...``, ``post_grad_custom_post_pass=...``), keeping the user's own after it. Ours see
    only the graphs Inductor compiles, never the subgraphs ``trace_shared`` made (``_OnCompiledGraphs``)."""
    import torch._inductor.config as inductor_config
    from torch._inductor import custom_graph_pass

    patches = {}
    for slot, pass_ in ours.items():
        pass_ = _OnCompiledGraphs(pass_)
        theirs = getattr(inductor_config, slot)
        if theirs is None:
            patches[slot] = pass_
            continue
        chain = [pass_, *(list(theirs) if isinstance(theirs, (list, tuple)) else [theirs])]
        patches[slot] = chain if hasattr(custom_graph_pass, "get_custom_graph_passes") else _chained(chain)
    return patches


class _OnCompiledGraphs(CustomGraphPass):
    """A velora_fx pass that skips the codec subgraphs ``trace_shared`` made: Inductor runs its joint and post-grad
    passes on the subgraphs of a graph too (the "newly created" ones among them), and a pass written for the joint
    or forward graph would plan, outline or summarize a subgraph as if it were that graph, over its real result."""

    def __init__(self, pass_: CustomGraphPass):
        self.pass_ = pass_

    def __call__(self, graph: torch.fx.Graph) -> None:
        if not is_shared_subgraph(graph):
            self.pass_(graph)

    def uuid(self) -> Any:
        return self.pass_.uuid()


def _chained(passes: list) -> Any:
    """One pass running ``passes`` in order, for a torch whose slots take a single pass (2.11). It is a
    ``CustomGraphPass`` (cacheable, keyed on every uuid) when all of them are; otherwise a plain function, which
    makes Inductor bypass its cache, as it would for the user's function alone."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    def run(graph):
        for pass_ in passes:
            pass_(graph)

    if not all(isinstance(p, CustomGraphPass) for p in passes):
        return run

    class Chained(CustomGraphPass):
        def __call__(self, graph):
            run(graph)

        def uuid(self):
            return tuple(p.uuid() for p in passes)

    return Chained()


def saved_for_backward(graph: torch.fx.Graph) -> Optional[list[torch.fx.Node]]:
    """The outputs of a partitioned forward graph that AOTAutograd saves for backward (possibly none); ``None`` for
    a graph that is not such a forward (a backward graph: its outputs are gradients; or one without descriptors)."""
    from torch._functorch._aot_autograd import descriptors

    kinds = tuple(getattr(descriptors, k) for k in ("SavedForBackwardsAOTOutput", "SavedForBackwardsNoVcCheckAOTOutput")
                  if hasattr(descriptors, k))  # fmt: skip
    output = graph.output_node()
    descs = output.meta.get("desc")
    if not descs or any(isinstance(d, descriptors.GradAOTOutput) for d in descs):
        return None
    return [n for n, d in zip(output.args[0], descs) if isinstance(d, kinds) and isinstance(n, torch.fx.Node)]


def input_positions(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each placeholder of an AOTAutograd graph that is a plain input, with its position among the compiled inputs."""
    from torch._functorch._aot_autograd.descriptors import PlainAOTInput

    return {n: n.meta["desc"].idx for n in graph.find_nodes(op="placeholder") if isinstance(n.meta.get("desc"), PlainAOTInput)}


def memory_budget_patch(budget: Optional[float]) -> contextlib.AbstractContextManager:
    """``torch._functorch.config.activation_memory_budget`` set for one compile (nothing when ``None``)."""
    import torch._functorch.config as functorch_config

    if budget is None:
        return contextlib.nullcontext()
    return functorch_config.patch(activation_memory_budget=budget)


def is_tangent(node: torch.fx.Node) -> bool:
    """Whether a placeholder of an AOTAutograd joint graph is a tangent (the gradient of an output)."""
    from torch._functorch._aot_autograd.descriptors import TangentAOTInput

    return isinstance(node.meta.get("desc"), TangentAOTInput)


def c_linear() -> Callable:
    """``torch._C._nn.linear``: the function Dynamo and ``symbolic_trace`` record for ``F.linear``."""
    return torch._C._nn.linear


def _traced(fn: Callable[..., Any], values: Sequence[Any]) -> torch.fx.GraphModule:
    """``fn`` traced on ``values`` (fake tensors of one graph, or constants) to aten ops with Inductor's
    decompositions (what a joint graph holds); the tensors are the placeholders, in order."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._dispatch.python import enable_python_dispatcher

    fake_mode = detect_fake_mode(values)

    def traced(*tensor_args):
        it = iter(tensor_args)
        return fn(*(next(it) if isinstance(v, torch.Tensor) else v for v in values))

    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(enable_python_dispatcher())
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        sub = make_fx(traced, decomposition_table=select_decomp_table(), tracing_mode="real")(*tensors)
    for node in sub.graph.nodes:
        if node.op == "get_attr":
            raise ValueError(f"tracing {fn}: it made a constant tensor ({node.target}); build it from the inputs")
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:  # a joint graph is functional
            raise ValueError(f"tracing {fn}: it mutates a tensor in place ({node.format_node()})")
    return sub


def _tensor_nodes(args: Sequence[Any]) -> tuple[list[Any], list[torch.fx.Node]]:
    values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    nodes = [a for a in args if isinstance(a, torch.fx.Node)]
    if len([v for v in values if isinstance(v, torch.Tensor)]) != len(nodes):
        raise ValueError("every tensor argument must be a node of the graph")
    return values, nodes


def trace_into(graph: torch.fx.Graph, fn: Callable[..., Any], args: Sequence[Any], before: torch.fx.Node,
               meta: Optional[dict[str, Any]] = None) -> Any:  # fmt: skip
    """Trace ``fn`` on the fake values of ``args`` (nodes of ``graph``, or constants) to aten ops, with Inductor's
    decompositions (what a joint graph holds), and insert the ops before ``before``. Returns ``fn``'s output with
    each tensor replaced by its node; every new node carries ``meta["val"]`` and, updated over it, ``meta``."""
    values, nodes = _tensor_nodes(args)
    sub = _traced(fn, values)
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(nodes)
    result = None
    with graph.inserting_before(before):
        for node in sub.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "output":
                result = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                env[node] = new = graph.node_copy(node, lambda n: env[n])
                new.meta.update(meta or {})
    return result


#: ``GraphModule.meta`` keys: on a graph's owner, its shared subgraphs by signature; on a subgraph, that it is one
_SHARED = "velora_fx.shared_subgraphs"
_IS_SHARED = "velora_fx.shared_subgraph"


@dataclasses.dataclass(frozen=True)
class _Shared:
    name: str  # the submodule's attribute on the graph's owner
    used: tuple[int, ...]  # which tensor arguments the subgraph reads (the others are not passed)
    outputs: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device], ...]  # size, stride, ...
    spec: Any  # the pytree spec of ``fn``'s output


def is_shared_subgraph(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` is a subgraph ``trace_shared`` made (Inductor runs its graph passes on it too)."""
    owner = graph.owning_module
    return owner is not None and bool(getattr(owner, "meta", {}).get(_IS_SHARED))


def trace_shared(graph: torch.fx.Graph, fn: Callable[..., Any], args: Sequence[Any], before: torch.fx.Node,
                 meta: dict[str, Any], key: Any, backward: bool = False) -> Any:  # fmt: skip
    """``trace_into``, but traced once per ``key`` and input signature into a submodule of ``graph``'s owner and
    called with ``invoke_subgraph``: Inductor lowers a subgraph once and generates its kernels once per compiled
    graph, however many calls read it (``trace_into`` inlines every call: its ops are lowered, scheduled and
    generated again for each, and fused into the kernels around it).

    The min-cut partitioner never recomputes a higher-order op (it is not in its allowlist of recomputable ops,
    and an output 4× smaller than the input counts as a reduction, whose output it saves): a call that reads only
    forward values runs in forward and its outputs are saved. ``backward=True`` tags the call ``MUST_RECOMPUTE``,
    which places it in backward, beside its users; a forward call always runs in forward (inlined, the partitioner
    may recompute the ops in backward instead, from what backward keeps anyway). Falls back to ``trace_into`` where
    a size is symbolic (a subgraph is traced for static sizes), ``graph`` has no owner, or an output is not a fresh
    tensor (one that aliases an input, a constant)."""
    values, nodes = _tensor_nodes(args)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    owner = graph.owning_module
    if owner is None or any(is_symbolic(s) for t in tensors for s in (*t.shape, *t.stride())):
        return trace_into(graph, fn, args, before, meta)
    signature = (key, tuple((tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in tensors),
                 tuple(v for v in values if not isinstance(v, torch.Tensor)))  # fmt: skip
    shared: dict[Any, Optional[_Shared]] = owner.meta.setdefault(_SHARED, {})
    if signature not in shared:
        shared[signature] = _share(owner, fn, values, tensors)
    entry = shared[signature]
    if entry is None:
        return trace_into(graph, fn, args, before, meta)
    fake_mode = detect_fake_mode(tensors)
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        outputs = [torch.empty_strided(size, stride, dtype=dtype, device=device)
                   for size, stride, dtype, device in entry.outputs]  # fmt: skip
    operands = [nodes[i] for i in entry.used]
    with graph.inserting_before(before):
        call = graph.call_function(torch.ops.higher_order.invoke_subgraph,
                                   (graph.get_attr(entry.name), entry.name, *operands))  # fmt: skip
        call.meta.update(meta)
        call.meta["val"] = tuple(outputs)
        if backward:
            call.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        items = []
        for i, value in enumerate(outputs):
            items.append(item := graph.call_function(operator.getitem, (call, i)))
            item.meta.update(meta)
            item.meta["val"] = value
    return pytree.tree_unflatten(items, entry.spec)


def _share(owner: torch.nn.Module, fn: Callable[..., Any], values: Sequence[Any],
           tensors: Sequence[torch.Tensor]) -> Optional[_Shared]:  # fmt: skip
    """``fn`` traced on ``values`` as a submodule of ``owner`` (``None``: an output is not a fresh tensor)."""
    specs = []

    def flat(*args):
        out, spec = pytree.tree_flatten(fn(*args))
        specs.append(spec)
        return tuple(out)

    sub = _traced(flat, values)
    outputs = sub.graph.find_nodes(op="output")[0].args[0]
    if not all(isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor) for node in outputs):
        return None  # a call's outputs are tensors
    results = [node.meta["val"] for node in outputs]
    if any(torch._C._is_alias_of(r, t) for r in results for t in tensors):
        return None
    used = []
    for i, placeholder in enumerate(list(sub.graph.find_nodes(op="placeholder"))):
        if placeholder.users:
            used.append(i)
        else:  # not read: not passed (a state the codec ignores, e.g., must not be saved for a backward call)
            sub.graph.erase_node(placeholder)
    sub.recompile()
    sub.meta[_IS_SHARED] = True
    name = f"velora_shared_{len(owner.meta[_SHARED])}"
    while hasattr(owner, name):
        name += "_"
    owner.register_module(name, sub)
    meta = tuple((tuple(r.shape), tuple(r.stride()), r.dtype, r.device) for r in results)
    return _Shared(name, tuple(used), meta, specs[0])
