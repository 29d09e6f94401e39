"""The quantized estimator: every coordinate of the input kept at a few bits, for the weight gradient only.

NOTE [quantized weight gradient]
A projection keeps a few coordinates of each token exactly and drops the
rest; this codec keeps *every* coordinate coarsely. Per token, the features
are cut into groups of ``G`` (``group_size``, zero-padded at the end); each
group keeps a low end ``lo`` and a step ``s`` (two bfloat16 numbers) and each
element one code ``c ∈ {0, …, 2^bits − 1}``::

    t  = (x − lo) / s                       ∈ [0, 2^bits − 1]
    c  = floor(t + u)                       u ~ U[0, 1): stochastic rounding (nearest: u = ½)
    x̂  = lo + c · s                         E[x̂] = x: unbiased
    dW ≈ scale · gᵀ x̂                       dx = g W, db = Σ g     (exact)

``lo`` is rounded *down* and ``s`` *up* to bfloat16 (a margin of 2⁻⁸ before
rounding), so that ``t`` never leaves ``[0, 2^bits − 1]``: clamping would
bias the estimate. Codes are packed eight at a time into ``bits`` bytes
(``bits = 8``: one byte each; ``_pack`` gives the layout), so an input of ``N × D`` elements keeps
``N·D·bits/8`` bytes of codes and ``4·N·D/G`` bytes of ``lo``/``s``: ``bits +
32/G`` bits per element, whatever the input's dtype (the bits are relative to
what the matmul reads: bfloat16 under autocast, else the input's dtype).

The uniforms ``u`` come from no generator: ``u = hash(key, i) / 2³²`` for
element ``i`` of the (padded) input, with ``key`` a 24-bit integer drawn from
(seed, weight, step) by the runtime and passed to the graph as its state
input. The hash is a handful of integer ops in int64 with every product below
2⁶³ (no overflow, identical on every backend), one op of the graph
(``_keyed_bits``) that Inductor fuses into the quantize kernel. So training
with velora_fx draws nothing from the user's generators (dropout, data order
unchanged), every rank draws the same ``u``, and a run resumed from a
checkpoint (its step counter) draws the same ``u`` again: bit-identical.

Rotation (``Quantized(rotation="hadamard")``): a group holding one large
coordinate has a wide range, and every other element of it gets a coarse
step. Multiplying each group by ``R = S H`` first (``H`` the ``G × G``
Walsh–Hadamard matrix of ±1, ``S`` random signs drawn from the key, ``R Rᵀ
= G·I``) spreads that coordinate over the group; backward rotates back::

    ẑ  = quantize(z R)                      per group, as above
    x̂  = ẑ Rᵀ / G                           E[x̂] = z R Rᵀ / G = z: still unbiased

Nothing more is kept (``S`` comes from the key, ``H`` from integer ops) but
the key itself, which backward now reads (4 bytes). The products run in
float32 even under autocast: a bfloat16 rotation would bias the estimate.

What a compressed input keeps is one uint8 record per token (``join``): the
codes, then the scales' bytes. One tensor, so that the partitioner cannot
keep the scales upcast to float32 instead (``join`` says why).

Everything here is plain tensor code on ``(N, D)`` rows: the FX route calls it
in an ``autograd.Function``, the compile backend traces it into the joint
graph (``GraphWriter.shared``: one subgraph per distinct encode or decode,
called by every input of its kind). One definition, two routes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _torch_internals as ti
from .codec import Estimator
from .ops import seed_for

__all__ = ["QuantizedCodec", "encode", "decode", "join", "split", "encode_record", "decode_record", "uniforms", "rotation",
           "key_for", "kept_bytes", "KEY_BITS"]

#: the state input holds the step's key as an integer below ``2**KEY_BITS`` in a float32 (exact)
KEY_BITS = 24

_M32 = 0xFFFFFFFF
_MARGIN = 2.0**-8  # bfloat16 keeps 8 significant bits: a relative margin of 2^-8 survives its rounding


def _mix32(h):
    """A 32-bit integer hash (xor-shift-multiply, after Wellons' lowbias32) of ``h`` in ``[0, 2^32)``, held in int64
    (a tensor, or a value in an Inductor kernel): both multipliers are below 2^31, so no product reaches 2^63."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    return h ^ (h >> 16)


def _uniform_hash(index, k, wide: bool):
    """The 24-bit integer behind the uniform of the element at flat ``index`` under key ``k`` (int64 both: tensors,
    or values in an Inductor kernel); ``wide``: whether an index may reach ``2**32`` (else its high half, which
    would xor 0, is left out: the same integers either way)."""
    k = (k * 0x9E3779B1) & _M32  # k < 2^24: the product < 2^56
    h = (index & _M32) ^ k ^ (((index >> 32) * 0x632BE5AB) & _M32) if wide else index ^ k
    return _mix32(h) >> 8


def _hadamard_hash(index, k, group_size: int):
    """Entry ``index`` (flat, row-major) of the ``group_size × group_size`` signed Walsh–Hadamard matrix of key ``k``
    as a bit, ``1`` for ``−1``: row ``i``'s sign (a second hash over the first one's output, so that the signs are
    not any element's uniforms) xor the parity of ``popcount(i & j)``, folded out with shifts."""
    shift = group_size.bit_length() - 1
    i, j = index >> shift, index & (group_size - 1)
    sign = _mix32(_mix32(i ^ ((k * 0x9E3779B1) & _M32)) ^ 0x5BD1E995)
    v = i & j
    for s in (16, 8, 4, 2, 1):
        v = v ^ (v >> s)
    return (sign ^ v) & 1


def _keyed_hash(index, k, shape, wide: bool, kind: str):
    """``_uniform_hash`` (``kind="uniform"``) or ``_hadamard_hash`` (``"hadamard"``, ``shape`` square) of each
    element: what ``_keyed_bits`` computes, in eager and in Inductor's kernel alike."""
    return _uniform_hash(index, k, wide) if kind == "uniform" else _hadamard_hash(index, k, int(shape[-1]))


@torch.library.custom_op("velora_fx::keyed_bits", mutates_args=())
def _keyed_bits(key: torch.Tensor, shape: list[int], kind: str) -> torch.Tensor:
    """``_keyed_hash`` of every element of an int64 tensor of ``shape``, from ``key`` and the element's flat index.

    An op of its own, so that Inductor computes the hash as written (``_torch_internals.lower_indexed``). Traced
    torch op by torch op, each xor-shift ``h ^ (h >> s)`` is inlined into both of its uses of ``h``, and the ops
    Inductor generates (and its compile time) double at every such step: 8× the uniforms' first ops, 32× and 64×
    the rotation's. The integers are the same either way."""
    numel = math.prod(shape)
    index = torch.arange(numel, device=key.device, dtype=torch.int64).view(shape)
    return _keyed_hash(index, key.to(torch.int64), shape, numel > _M32, kind)


@_keyed_bits.register_fake
def _(key: torch.Tensor, shape: list[int], kind: str) -> torch.Tensor:
    return key.new_empty(shape, dtype=torch.int64)


ti.lower_indexed(torch.ops.velora_fx.keyed_bits.default, _keyed_hash)


def uniforms(key: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``U[0, 1)`` float32 numbers, one per element of ``rows`` (any shape), from ``key`` (a float32 tensor of
    shape ``(1,)`` holding an integer below ``2**KEY_BITS``) and each element's flat index."""
    return _keyed_bits(key, list(rows.shape), "uniform").to(torch.float32) * 2.0**-24


def rotation(key: torch.Tensor, group_size: int) -> torch.Tensor:
    """``S H``: the ``group_size × group_size`` Walsh–Hadamard matrix with its rows' signs drawn from ``key``, as
    float32 ``±1`` entries (NOTE [quantized weight gradient], "Rotation"). ``(S H)(S H)ᵀ = group_size · I``.

    ``H[i, j] = (−1)^popcount(i & j)``: integer ops only (``_hadamard_hash``), so both routes build it in the graph
    from the key (nothing to keep)."""
    return (1 - 2 * _keyed_bits(key, [group_size, group_size], "hadamard")).to(torch.float32)


def _rotate(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``z @ r`` in float32 whatever autocast says: the rotation is part of the estimator, not of the model's
    matmuls, and a bfloat16 product would bias it."""
    with torch.autocast(z.device.type, enabled=False):
        return torch.matmul(z, r)


@torch.library.custom_op("velora_fx::in_buffer", mutates_args=())
def _in_buffer(x: torch.Tensor) -> torch.Tensor:
    """``x``, computed once into a buffer of its own under Inductor (``_torch_internals.lower_as_buffer``); a copy
    in eager. Left to its own choice, Inductor inlines a cheap pointwise value into each of its reads, and keeps
    the ops of every copy in the kernel's body: its code generation (and compile time) grows with them.

    * The codes, which ``_pack`` reads once per plane. Nearest-rounded, each inlined read indexes a group's ``lo``
      and ``s`` through a floor division of the plane's position, which Inductor's C++ code does not vectorize: a
      scalar loop wherever the groups do not tile the planes (5–17× slower at 1–3 bits, 384 or 688 features).
      Stochastic, the hash was inlined into every plane.
    * Each group's ``lo`` and ``s``, which the codes and the record's scale bytes read: inlined, the bfloat16
      roundings ran again in each of the six reads (and ``lo``'s in ``s``'s)."""
    return x.clone()


@_in_buffer.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


ti.lower_as_buffer(torch.ops.velora_fx.in_buffer.default)


def _stored_once(x: torch.Tensor) -> torch.Tensor:
    """``_in_buffer(x)`` where a compiler traces (Dynamo, or the backend's tracing on fake values); ``x``
    itself in eager (the FX route's ``autograd.Function``), where the buffer would only be a copy on the training
    step."""
    return _in_buffer(x) if torch.compiler.is_compiling() or ti.is_fake(x) else x


def _groups(features: int, group_size: int) -> int:
    return -(-features // group_size)


def encode(x: torch.Tensor, key: torch.Tensor, bits: int, group_size: int, stochastic: bool,
           rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The codes and the per-group ``(lo, s)`` of ``x`` of shape ``(..., D)`` (NOTE [quantized weight gradient]).

    Returns:
        ``codes``: uint8 of shape ``(N, ceil(D / G) · G · bits / 8)``, ``N`` the number of tokens;
        ``scales``: bfloat16 of shape ``(N, ceil(D / G), 2)``, ``lo`` and ``s`` of each group.

    Example::

        >>> x = torch.randn(4, 64)
        >>> codes, scales = encode(x, key_for(0, "w", 0), bits=2, group_size=32, stochastic=True)
        >>> codes.shape, codes.dtype, scales.shape
        (torch.Size([4, 16]), torch.uint8, torch.Size([4, 2, 2]))
    """
    codes, lo, step = _quantize(x, key, bits, group_size, stochastic, rotated)
    return codes, torch.stack([lo, step], dim=-1).to(torch.bfloat16)  # exact: already bfloat16 values


def _quantize(x: torch.Tensor, key: torch.Tensor, bits: int, group_size: int, stochastic: bool,
              rotated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``encode``, with ``lo`` and ``s`` as float32 tensors of shape ``(N, ceil(D / G))`` holding bfloat16 values."""
    features = x.shape[-1]
    n = _groups(features, group_size)
    z = x.reshape(-1, features).float()
    if n * group_size != features:
        z = torch.nn.functional.pad(z, (0, n * group_size - features))
    z = z.view(-1, n, group_size)
    if rotated:
        z = _rotate(z, rotation(key, group_size))
    levels = 2**bits - 1
    lo_f, hi = z.amin(-1), z.amax(-1)
    lo = _round_to_bfloat16(lo_f - lo_f.abs() * _MARGIN)  # at most lo_f
    step = _round_to_bfloat16((hi - lo) * ((1.0 + _MARGIN) / levels))  # at least (hi - lo) / L
    lo, step = _stored_once(lo), _stored_once(step)  # (N, groups): read by the codes and the scale bytes
    inverse = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    t = (z - lo.unsqueeze(-1)) * inverse.unsqueeze(-1)
    u = uniforms(key, t) if stochastic else 0.5
    codes = torch.floor(t + u).clamp(0, levels)
    codes = codes.to(torch.uint8)
    if bits < 8:  # stored once, for ``_pack`` to read (``_in_buffer`` says why); 8-bit codes are the record's bytes
        codes = _stored_once(codes)
    return _pack(codes.view(-1, n * group_size), bits), lo, step


def _round_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, finite) rounded to the nearest bfloat16 value, ties to even, *as a float32 tensor*.

    Not ``x.to(bfloat16).float()``: Inductor may fuse that round trip away (``emulate_precision_casts`` is off by
    default), and then the codes would be computed against a low end and step other than those kept — a bias.
    Integer ops on the bits are kept as written."""
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # add half an ulp of bfloat16 (ties to even), truncate
    return bits.view(torch.float32)


def decode(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, features: int,
           dtype: torch.dtype, key: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """``x̂`` of shape ``(N, features)`` in ``dtype`` from ``encode``'s output; ``key``: the one ``encode`` was
    given, when it rotated (``rotated=True``), else ``None``."""
    lo, step = scales.float().unbind(-1)
    return _dequantize(codes, lo, step, bits, group_size, features, dtype, key)


def _dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int, group_size: int, features: int,
                dtype: torch.dtype, key: Optional[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``decode``, from float32 ``lo`` and ``s`` of shape ``(N, ceil(D / G))``."""
    n = lo.shape[-1]
    c = _unpack(codes, bits).view(-1, n, group_size).to(torch.float32)
    x_hat = c * step.unsqueeze(-1) + lo.unsqueeze(-1)
    if key is not None:
        x_hat = _rotate(x_hat, rotation(key, group_size).t()) * (1.0 / group_size)  # (S H)⁻¹ = (S H)ᵀ / G: exact scale
    x_hat = x_hat.view(-1, n * group_size)
    if n * group_size != features:
        x_hat = x_hat[:, :features]
    return x_hat.to(dtype)


def _fields(bits: int):
    """Where the 8 codes of a packed word sit in its ``bits`` bytes: ``(k, j, s)`` for each code ``k`` and byte
    ``j`` that share bits, ``s`` the shift taking code ``k`` to its place in byte ``j`` (code ``k`` holds bits
    ``bits · k`` to ``bits · k + bits − 1`` of the word, byte ``j`` bits ``8j`` to ``8j + 7``)."""
    return [(k, j, bits * k - 8 * j) for k in range(8) for j in range(bits)
            if 8 * j < bits * (k + 1) and bits * k < 8 * (j + 1)]  # fmt: skip


def _shift(v: torch.Tensor, s: int) -> torch.Tensor:
    return v if s == 0 else v << s if s > 0 else v >> -s


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(N, M)`` integer codes below ``2**bits`` as ``(N, M · bits / 8)`` uint8: eight codes in ``bits`` bytes.

    Layout, per token: the ``M`` codes are cut into 8 planes of ``M / 8`` consecutive codes; word ``i`` holds code
    ``i`` of every plane, plane ``k`` at bit ``bits · k``; the words are stored as ``bits`` byte planes of ``M / 8``
    bytes, low byte first. Planes, not eight neighbouring codes per word, so that every load and store is
    contiguous: Inductor vectorizes the packing and fuses it with the codes' computation (a sum over a trailing
    dimension of 8 made it a scalar loop, and the whole quantizer 4-7× slower on CPU). Each byte is or-ed from the
    codes it holds (``_fields``), in int32: no value exceeds 16 bits."""
    if bits == 8:
        return codes.to(torch.uint8)
    m = codes.shape[-1]
    c = codes.to(torch.int32).view(-1, 8, m // 8)
    byte_planes = [_or_all([_shift(c[:, k], s) for k, j, s in _fields(bits) if j == byte]) for byte in range(bits)]
    if 8 % bits:  # a code straddles two bytes (3 bits): drop what was shifted past its byte
        byte_planes = [p & 0xFF for p in byte_planes]
    # each plane narrowed before it is stacked: Inductor writes the uint8 planes in place, not an int32 copy first
    return torch.stack([p.to(torch.uint8) for p in byte_planes], dim=1).view(-1, m * bits // 8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``_pack``: ``(N, M)`` int32 codes."""
    if bits == 8:
        return packed.to(torch.int32)
    m = packed.shape[-1] * 8 // bits
    b = packed.to(torch.int32).view(-1, bits, m // 8)
    codes = [_or_all([_shift(b[:, j], -s) for k, j, s in _fields(bits) if k == code]) for code in range(8)]
    return (torch.stack(codes, dim=1) & (2**bits - 1)).view(-1, m)


def _or_all(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The bitwise or of ``pieces``, in order. Each byte (code) is built at once from its own list, not assigned into
    a list of outputs: so that ``torch.compile`` traces the codec whole on every supported torch (2.11's Dynamo does
    not trace ``list.__setitem__``)."""
    out = pieces[0]
    for piece in pieces[1:]:
        out = out | piece
    return out


def join(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``encode``'s two tensors as one uint8 record per token: the codes, then each group's ``lo`` and ``s`` as
    bfloat16 bytes (little-endian).

    What the compiled graph keeps. Kept apart, the scales are read back in backward with ``.float()``, and the
    min-cut partitioner, which counts a bfloat16 tensor that only a cheap upcast reads as twice its size, keeps
    the float32 upcast instead: twice the scales' bytes. One record leaves it no such cut: the codes must be kept
    anyway, and any tensor computed from the record only adds bytes."""
    lo, step = scales.float().unbind(-1)
    return _record(codes, lo, step)


def _record(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``join`` from float32 ``lo`` and ``s`` holding bfloat16 values: a bfloat16's bits are the high half of its
    float32's, so the bytes come from int32 shifts (which Inductor vectorizes; a bfloat16 bitcast it does not)."""
    parts = []
    for v in (lo, step):
        b = v.view(torch.int32)
        parts += [((b >> 16) & 0xFF).to(torch.uint8), ((b >> 24) & 0xFF).to(torch.uint8)]
    scale_bytes = torch.stack(parts, dim=-1)  # (N, groups, 4): lo's two bytes, then s's
    return torch.cat([codes, scale_bytes.view(codes.shape[0], -1)], dim=-1)


def split(record: torch.Tensor, bits: int, group_size: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``join``: ``(codes, scales)`` as ``encode`` returned them."""
    codes, lo, step = _unrecord(record, bits, group_size, features)
    return codes, torch.stack([lo, step], dim=-1).to(torch.bfloat16)  # exact: bfloat16 values


def _unrecord(record: torch.Tensor, bits: int, group_size: int,
              features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``split``, with ``lo`` and ``s`` as float32 of shape ``(N, ceil(D / G))``: each bfloat16's two bytes shifted
    to the high half of a float32's bits (exactly its value)."""
    n = _groups(features, group_size)
    width = n * group_size * bits // 8
    b = record[:, width:].to(torch.int32).view(-1, n, 2, 2)
    # (N, groups, 2); a high byte of 128 or more shifts into the sign bit: torch and Inductor's C++ shift int32 as
    # unsigned, Triton wraps, so the bits are the bfloat16's on every backend
    f = ((b[..., 0] << 16) | (b[..., 1] << 24)).view(torch.float32)
    return record[:, :width], f[..., 0], f[..., 1]


def encode_record(x: torch.Tensor, key: torch.Tensor, bits: int, group_size: int, stochastic: bool,
                  rotated: bool = False) -> torch.Tensor:  # fmt: skip
    """``join(*encode(...))`` without the bfloat16 tensors in between: what the codec runs in forward."""
    return _record(*_quantize(x, key, bits, group_size, stochastic, rotated))


def decode_record(record: torch.Tensor, bits: int, group_size: int, features: int, dtype: torch.dtype,
                  key: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """``decode(*split(...))`` without the bfloat16 tensors in between: what the codec runs in backward."""
    codes, lo, step = _unrecord(record, bits, group_size, features)
    return _dequantize(codes, lo, step, bits, group_size, features, dtype, key)


def key_for(seed: int, name: str, step: int) -> torch.Tensor:
    """The state input of step ``step`` of the weight ``name``: a float32 ``(1,)`` tensor holding a
    ``KEY_BITS``-bit integer drawn from ``(seed, name, step)``; never 0 (all-zero state reads as uncalibrated)."""
    return torch.tensor([float(1 + seed_for(seed, name, step) % (2**KEY_BITS - 1))], dtype=torch.float32)


def kept_bytes(shape, bits: int, group_size: int, rotated: bool = False) -> int:
    """Bytes ``encode`` keeps for an input of ``shape`` (``(..., D)``): codes and scales, and when it rotated, the
    key (``(1,)`` float32), which backward reads to rotate back."""
    features = int(shape[-1]) if len(shape) else 1
    tokens = math.prod(int(s) for s in shape) // features if features else 0
    n = _groups(features, group_size)
    return tokens * (n * group_size * bits // 8 + n * 2 * 2) + (4 if rotated else 0)


class QuantizedCodec(Estimator):
    """``VeloraConfig(estimator=Quantized(bits, group_size, rounding))``: every coordinate at ``bits`` bits, one
    bfloat16 low end and step per group (NOTE [quantized weight gradient]); unbiased under stochastic rounding.

    State: the step's key (``(1,)``, saved as ``velora_fx.<weight>.key``), drawn anew from ``(seed, weight,
    step)`` on every training step: the step counter is always kept, so a resumed run draws what the
    uninterrupted one would. Weights reading one input share one key and one set of codes.
    """

    field = "key"
    traced = True

    @property
    def settings(self):
        return self.config.estimator

    @property
    def refresh_every(self) -> int:
        return 1  # a new key every step

    def basis_shape(self, features: int):
        q = self.settings
        return (q.group_size, q.bits, q.rotation == "hadamard", q.rounding == "stochastic"), ""

    def state_shape(self, basis_shape) -> tuple[int, ...]:
        return (1,)

    def initial(self, basis_shape, name: str):
        return key_for(self.config.seed, name, 0), self._step()

    def statistics(self, x: torch.Tensor, basis_shape):
        return torch.zeros(1, dtype=torch.float64), 0

    def calibrated(self, total, count, name, basis_shape):
        return key_for(self.config.seed, name, 0)

    def refreshed(self, basis, total, count, name, index):
        return key_for(self.config.seed, name, index)

    # The site's sizes and rounding come from its ``basis_shape``, ``(group_size, bits, rotated, stochastic)``, not from
    # the settings: a per-weight override (``VeloraConfig.overrides``) gives each site its own.

    def encode(self, x: torch.Tensor, state: torch.Tensor, basis_shape) -> tuple[torch.Tensor, ...]:
        group_size, bits, rotated, stochastic = basis_shape
        return (encode_record(x, state, bits, group_size, stochastic, rotated),)

    def decode(self, saved: Sequence[torch.Tensor], state: torch.Tensor, basis_shape, features: int,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        group_size, bits, rotated, _ = basis_shape
        return decode_record(saved[0], bits, group_size, features, dtype, state if rotated else None)

    def kept_bytes(self, shape, dtype, basis_shape) -> int:
        group_size, bits, rotated, _ = basis_shape
        return kept_bytes(shape, bits, group_size, rotated)

    def per_token(self, features: int, basis_shape) -> float:
        group_size, bits, _, _ = basis_shape
        return bits + 32 / group_size

    def describe(self, basis_shape) -> str:
        group_size, bits, rotated, stochastic = basis_shape
        rounding = "" if stochastic else ", nearest rounding"
        return f"{bits} bit{'s' * (bits > 1)} in groups of {group_size}{', Hadamard-rotated' * rotated}{rounding}"
