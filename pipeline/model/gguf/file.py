"""Reading llama.cpp GGUF files: header (metadata + tensor table) and tensors in MLX's layout.

Tensor policy (see `read_tensors`):
  - F32 / F16 / BF16: float arrays as stored.
  - Q4_0 / Q4_1 / Q8_0: kept quantised, in the layout `mx.load` gives them and
    `mx.quantized_matmul` consumes: `<name>.weight` (uint32, packed along the input dim),
    `<name>.scales`, `<name>.biases` ([rows, cols/32]), affine mode, group 32, 4 or 8 bits.
    These types map exactly onto MLX's affine groups (w = scale * q + bias), so nothing is lost.
  - everything else (K-quants, Q5_*, IQ*, TQ*, MXFP4): `mx.load` either fails on them
    (Q5_0: "gguf_tensor_to_f16 failed") or silently expands them to f16, so we read their
    blocks with the `gguf` package's memory-mapped reader. Then:
      * Q5_0, Q5_1, Q4_K, Q5_K are affine per group of 32 (w = scale * q + bias with q on a
        4/5-bit grid), so their codes q and each group's (scale, bias) are read off the blocks
        and packed in MLX's layout: exact, nothing re-rounded (tests compare the values with
        the gguf package's dequantisers);
      * the rest (Q6_K's 16-value sub-blocks, Q2_K/Q3_K, the non-uniform IQ grids) are
        dequantised with the gguf package's numpy dequantisers and re-quantised with
        `mx.quantize` (affine, group 32) at the width in `REQUANT_BITS`:
        a second rounding, under one step of the new grid (Q6_K goes to 8 bits: near-lossless
        for the output/embedding tensors Q4_K_M files keep in Q6_K).

When every tensor is of a native type we let `mx.load` read the whole file (fast C++ path);
otherwise every tensor goes through the reader, with Q4_0/Q4_1/Q8_0 blocks repacked exactly
into the same MLX layout in numpy (`repack_native`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from framecast.errors import ModelLoadError

GROUP_SIZE = 32  # llama.cpp's block size for Q4_0/Q4_1/Q8_0; also our re-quantisation group

# ggml type ids (gguf.GGMLQuantizationType) used below by name
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
NATIVE_TYPES = {F32, F16, BF16, Q4_0, Q4_1, Q8_0}

# Re-quantisation width for non-native types: the narrowest MLX affine width that does not
# throw away precision the source had (never below 4 bits: 2/3-bit MLX groups of 32 lose more
# than the K-quants' super-block scales did).
REQUANT_BITS = {
    "Q5_0": 5, "Q5_1": 5, "Q8_1": 8,
    "Q2_K": 4, "Q3_K": 4, "Q4_K": 4, "Q5_K": 5, "Q6_K": 8, "Q8_K": 8,
    "IQ1_S": 4, "IQ1_M": 4, "IQ2_XXS": 4, "IQ2_XS": 4, "IQ2_S": 4, "IQ3_XXS": 4, "IQ3_S": 4,
    "IQ4_NL": 4, "IQ4_XS": 4, "TQ1_0": 4, "TQ2_0": 4, "MXFP4": 4,
}

_MAGIC = b"GGUF"
# GGUF value type id -> struct format (scalars)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


def type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first): ggml's ne reversed
    type_id: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)


@dataclass
class GGUFHeader:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelLoadError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return self.metadata[key]

    @property
    def arch(self) -> str:
        return str(self.require("general.architecture"))


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF header")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.take("I"), self.take("Q")
            if item_type in _NP:  # numbers: one vectorised read
                arr = np.frombuffer(self.buf, dtype=_NP[item_type], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(item_type) for _ in range(n)]
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}")


def read_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file (no tensor data is read)."""
    path = str(path)
    if not Path(path).is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ModelLoadError(f"{path}: empty file, not a GGUF") from None
    try:
        cur = _Cursor(buf, path)
        if bytes(buf[:4]) != _MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.take("I"))
        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("I")
            ne = [cur.take("Q") for _ in range(n_dims)]
            type_id = cur.take("I")
            cur.take("Q")  # data offset: the readers below find the data themselves
            tensors[name] = TensorInfo(name, tuple(reversed(ne)), type_id)
    finally:
        buf.close()
    if int(meta.get("split.count", 1) or 1) > 1:
        raise ModelLoadError(f"{path}: split GGUF ({meta['split.count']} parts) is not supported; merge it first "
                             "(llama-gguf-split --merge FIRST-PART OUT.gguf)")
    return GGUFHeader(path, meta, tensors)


# -- exact repacking of llama.cpp blocks into MLX affine groups ----------------------------------


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    # q: [rows, cols] uint8 in 0..15 -> [rows, cols/8] uint32, element i in bits 4i (MLX order)
    pairs = q.reshape(q.shape[0], -1, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed).view("<u4")


def repack_native(raw: np.ndarray, type_id: int, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """(weight uint32, scales f16, biases f16) for Q4_0/Q4_1/Q8_0 blocks `raw` [rows, bytes]."""
    nb = cols // GROUP_SIZE
    blocks = raw.reshape(rows, nb, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [rows, nb]
    if type_id == Q8_0:  # d, 32 x int8: w = d*q = d*(q+128) - 128*d
        q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128
        weight = np.ascontiguousarray(q.astype(np.uint8).reshape(rows, cols)).view("<u4")
        return weight, d, (-128.0 * d.astype(np.float32)).astype(np.float16)
    if type_id == Q4_0:  # d, 16 bytes; w = d*(q-8); low nibbles = elements 0..15, high = 16..31
        qs, bias = blocks[..., 2:18], (-8.0 * d.astype(np.float32)).astype(np.float16)
    elif type_id == Q4_1:  # d, m, 16 bytes; w = d*q + m
        qs, bias = blocks[..., 4:20], blocks[..., 2:4].copy().view(np.float16)[..., 0]
    else:
        raise ModelLoadError(f"cannot repack {type_name(type_id)} blocks")
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return _pack_nibbles(q), d, bias


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] ints in 0..2^bits-1 -> [rows, cols*bits/32] uint32, MLX's packing.

    MLX stores a row as one little-endian bit stream, element i in bits [i*bits, (i+1)*bits),
    so a group of 32 elements fills exactly `bits` words. Each element is shifted into a 64-bit
    accumulator of the word it starts in; bits past 32 then carry into the next word.
    """
    rows, cols = q.shape
    groups = q.reshape(-1, 32).astype(np.uint64)  # [G, 32]
    acc = np.zeros((groups.shape[0], bits), dtype=np.uint64)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        acc[:, word] |= groups[:, i] << np.uint64(shift)
    out = (acc & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    out[:, 1:] |= (acc[:, :-1] >> np.uint64(32)).astype(np.uint32)
    return out.reshape(rows, cols * bits // 32)


# type -> bits of the types whose every group of 32 is affine (exact MLX repack)
EXACT_AFFINE_BITS = {"Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}


def affine_group_params(raw: np.ndarray, type_name_: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per group of 32 ([rows, cols/32] float32) read from the block headers."""
    import gguf
    from gguf.quants import Q4_K

    _, block_bytes = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name_)]
    blocks = raw.reshape(rows, -1, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name_ == "Q5_0":  # w = d * (q - 16)
        return d, -16.0 * d
    if type_name_ == "Q5_1":  # w = d * q + m
        return d, blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    # Q4_K / Q5_K: 256-value super-blocks of 8 sub-blocks; w = d*sc_j * q - dmin*m_j
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    sc = sc.reshape(rows, -1, 8).astype(np.float32)
    mn = mn.reshape(rows, -1, 8).astype(np.float32)
    return (d[..., None] * sc).reshape(rows, -1), (-dmin[..., None] * mn).reshape(rows, -1)


def affine_group_codes(raw: np.ndarray, type_name_: str, rows: int, cols: int) -> np.ndarray:
    """The integer codes q ([rows, cols] uint8) of Q5_0/Q5_1/Q4_K/Q5_K blocks, read bit for bit."""
    import gguf

    _, block_bytes = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name_)]
    blocks = raw.reshape(-1, block_bytes)
    n = blocks.shape[0]
    if type_name_ in ("Q5_0", "Q5_1"):  # [d (, m)] qh:u32 qs[16]: low nibbles 0..15, high 16..31
        head = 2 if type_name_ == "Q5_0" else 4
        qh = blocks[:, head:head + 4].copy().view("<u4")  # [n, 1]: bit i = high bit of value i
        qs = blocks[:, head + 4:head + 20]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [n, 32]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return (low | (high << 4)).reshape(rows, cols)
    # Q4_K / Q5_K super-blocks: d, dmin, scales[12], (qh[32],) qs[128]; qs byte i of pair j holds
    # sub-block 2j (low nibble) and 2j+1 (high nibble); Q5_K's qh bit k tops sub-block k.
    qs = blocks[:, -128:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32)
    if type_name_ == "Q5_K":
        qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = q | ((qh & 1) << 4)
    return q.reshape(rows, cols)


def _exact_affine(raw: np.ndarray, type_name_: str, rows: int, cols: int) -> dict[str, mx.array]:
    """Q5_0/Q5_1/Q4_K/Q5_K in MLX's layout on their own grid (codes and scales as stored)."""
    bits = EXACT_AFFINE_BITS[type_name_]
    q = affine_group_codes(raw, type_name_, rows, cols)
    scale, bias = affine_group_params(raw, type_name_, rows, cols)
    packed = _pack_nibbles(q) if bits == 4 else pack_bits(q, bits)
    return {"weight": mx.array(packed), "scales": mx.array(scale), "biases": mx.array(bias)}


def _requantize(values: np.ndarray, bits: int) -> dict[str, mx.array]:
    w, scales, biases = mx.quantize(mx.array(values, dtype=mx.float32), group_size=GROUP_SIZE, bits=bits)
    return {"weight": w, "scales": scales, "biases": biases}


def read_tensors(header: GGUFHeader, *, use_mx_load: bool = True) -> dict[str, mx.array]:
    """Every tensor of the file, keyed `<gguf name minus .weight>.{weight,scales,biases}` or as is.

    Quantised tensors come back as three arrays (`X.weight`, `X.scales`, `X.biases`), exactly
    as `mx.load` names them; float tensors as one. `use_mx_load=False` forces the numpy path.
    """
    infos = header.tensors.values()
    if use_mx_load and all(t.type_id in NATIVE_TYPES for t in infos):
        try:
            return mx.load(header.path)
        except Exception as e:  # corrupt data: name the file, not mlx's internals
            raise ModelLoadError(f"{header.path}: cannot read tensors: {str(e).splitlines()[0]}") from None
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(header.path)
    out: dict[str, mx.array] = {}
    for t in reader.tensors:
        info = header.tensors[t.name]
        qt, base = info.type_id, t.name.removesuffix(".weight")
        if qt in (F32, F16):
            out[t.name] = mx.array(np.asarray(t.data).reshape(info.shape))
        elif qt == BF16:
            out[t.name] = mx.array(dequantize(np.asarray(t.data), qt).reshape(info.shape)).astype(mx.bfloat16)
        elif qt in (Q4_0, Q4_1, Q8_0):
            rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
            w, s, b = repack_native(np.asarray(t.data), qt, rows, cols)
            out[f"{base}.weight"], out[f"{base}.scales"], out[f"{base}.biases"] = map(mx.array, (w, s, b))
        else:
            bits = REQUANT_BITS.get(info.type_name)
            if bits is None:
                raise ModelLoadError(
                    f"{header.path}: tensor {t.name} has quantisation type {info.type_name}, which is not supported")
            raw = np.asarray(t.data)
            if len(info.shape) < 2 or info.shape[-1] % GROUP_SIZE:
                out[t.name] = mx.array(dequantize(raw, qt).reshape(info.shape))  # too small to group
                continue
            rows = int(np.prod(info.shape[:-1]))
            if info.type_name in EXACT_AFFINE_BITS:
                parts = _exact_affine(raw.reshape(rows, -1), info.type_name, rows, info.shape[-1])
            else:
                parts = _requantize(dequantize(raw, qt).reshape(info.shape), bits)
            for k, v in parts.items():
                out[f"{base}.{k}"] = v
    return out


def dequantize_entry(weights: dict[str, mx.array], name: str) -> mx.array:
    """Float values of tensor `name` (`X.weight`), whether it is stored quantised or not."""
    base = name.removesuffix(".weight")
    if f"{base}.scales" not in weights:
        return weights[name]
    w, s, b = weights[name], weights[f"{base}.scales"], weights[f"{base}.biases"]
    bits = w.shape[-1] * 32 // (s.shape[-1] * GROUP_SIZE)
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=GROUP_SIZE, bits=bits)


def default_dtype(dtype: str | mx.Dtype | None, header: GGUFHeader | None = None) -> mx.Dtype:
    """One float dtype for every float tensor (weights, norms, quantisation scales).

    GGUF files mix F32 norms with F16/BF16 (or quantised, f16-scaled) matrices; mixing dtypes
    would promote activations and re-cast weights on every call, so everything gets one dtype:
    the caller's, else float32 on the CPU (fp16 matmuls, quantised ones included, are slow
    there), else bfloat16 for files that store BF16 and float16 for the rest.
    """
    if isinstance(dtype, str):
        return getattr(mx, dtype)
    if dtype is not None:
        return dtype
    if mx.default_device() == mx.cpu:
        return mx.float32
    stores_bf16 = header is not None and any(t.type_id == BF16 for t in header.tensors.values())
    return mx.bfloat16 if stores_bf16 else mx.float16


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Cast float tensors (weights, norms, scales, biases) to `dtype`; packed uint32 stays."""
    if dtype is None:
        return weights
    return {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
