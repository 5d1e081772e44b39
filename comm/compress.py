"""Gradient compressors: one interface for parameter-server pushes and the ring's reducer.

A compressor turns a 1-D float32/float64 gradient into a payload and back. `key` names a
stream (a reducer bucket, a server shard): what a method carries from step to step (the
error-feedback residual, DGC's momentum, PowerSGD's Q) is kept per key, so a key must
always come with the same length and dtype. Only payloads travel: `to_buffer` packs one into
a single uint8 message that describes itself (`from_buffer` needs nothing else), so a push
is one Send and one Recv. `decompress` gives back a gradient of the original length and
dtype; `payload_bytes` is the message's length (header included).

The methods (s = bytes per element, 4 or 8; n elements):

- `none`: the gradient itself (not a copy).
- `fp16`: scaled by 2^-e, the power of two that puts max|g| in [2^14, 2^15), then cast to
  float16 (round to nearest). A power of two scales exactly, and the scaled maximum stays
  below 65504, so nothing overflows whatever the magnitudes: large gradients are scaled,
  not saturated. Bound, per element: |x - x^| <= max(2^-11 |x|, 2^(e-25)), i.e. relative
  2^-11 (float16's unit roundoff) for every |x| >= max|g| 2^-28 (a normal float16 after
  scaling) and absolute <= max|g| 2^-39 below that, where float16 is subnormal.
- `int8`: blocks of B = 256 elements, each with its own scale = max|block| / 127 (in the
  gradient's dtype) and q = round(x / scale) in [-127, 127]. Bound: |x - x^| <= scale / 2 =
  max|block| / 254, plus the roundings of x / scale and q * scale (<= 127 scale ulp; a
  float32 block whose maximum is below ~2^-119 has a subnormal scale and a looser bound).
  Optional error feedback (`Int8Compressor(error_feedback=True)`).
- `topk`: the k = ceil(ratio n) entries of largest magnitude, with error feedback: what is
  not sent stays in a local residual v that is added to the next gradient. With momentum
  m > 0 it is DGC's momentum correction (Lin et al. 2018): u = m u + g; v = v + u; send the
  top k of v; zero v and u where sent. With m = 0 it is plain error feedback (v = v + g).
  DGC's correction stands in for SGD's momentum: with AdamW, which has its own, keep m = 0.
  Then for every key, after T steps: sum of the decompressed payloads + residual = sum of
  the gradients (exactly, where the additions are exact).
- `powersgd`: rank r (Vogels et al. 2019). The gradient plus the residual, zero-padded,
  is viewed as an M of rows x cols, cols = ceil(sqrt(n)), rows = ceil(n / cols) <= cols,
  and r' = min(r, rows). One power iteration from the key's persistent Q (cols x r', drawn
  from the fixed seed `POWERSGD_SEED`, so every rank starts from the same Q): P = M Q;
  P^ = orthonormalise(P) (Householder QR: stays orthonormal when P is rank deficient, where
  Gram-Schmidt divides by zero); Q = M^T P^; the approximation is P^ Q^T, the payload
  (P^, Q), the residual M - P^ Q^T, and Q is kept as the next step's start (warm start).
  At r' = rows P^ is square orthogonal, so P^ Q^T = P^ P^T M = M: full rank is exact.
  The bucket is reshaped as a whole, not layer by layer as in the paper, where weight
  matrices give the low-rank structure; error feedback sends what is missed later.

Bytes of one payload (`wire_bytes`): a header of int32 words (method, dtype, n, and the
method's sizes), padded to 8 bytes, then:

    none      16 + s n
    fp16      16 + 2 n
    int8      16 + s ceil(n / 256) + n
    topk      16 + k (s + 2) + 4 ceil(n / 65536)      k = ceil(ratio n)
    powersgd  24 + s r' (rows + cols)

Top-k indices go on the wire as 2 bytes each, not 4: sorted, their low 16 bits as uint16,
plus the count in each page of 65536 positions as uint32. That is lossless and what
makes top-k at ratio 0.01 send 66x fewer bytes than `none` in float32 (8 bytes an entry
would be 50x less the header's share: under 50).

Ring reduction, `all_reduce(comm, key, buf)`: buf becomes, in place, the sum over the ranks
of each rank's decompressed payload; only compressed data is sent, through our ring
(`comm.ring`). Every rank ends with the same bits (the same operations on the same data).
Bytes this rank sends (`all_reduce_bytes`), p ranks:

- none: the ring all-reduce, s sent_elements(all_reduce, n) ~ 2 (p-1)/p s n.
- fp16, int8, topk: a ring all-gather of every rank's payload buffer (all the same
  length L: it depends on n and dtype only), then the decompressed payloads are added in
  rank order in buf's dtype: (p-1) L. Adding in float16 hop by hop would round p-1 times;
  this rounds each gradient once. The price, against a float32 all-reduce (8 (p-1)/p n
  bytes): fp16 sends 4/p times fewer (2x at p = 2, the same at p = 4), int8 7.9/p times,
  top-k at ratio 0.01 133/p times (33x at p = 4), where a push to a server gets 2x, 3.9x
  and 66x.
- powersgd: the all-reduce-friendly scheme of the paper, with sums where it has means
  (orthonormalisation does not see the scale), rank i:

      M_i = pad(g_i + e_i);  P = sum_i M_i Q   (ring all-reduce)
      P^ = orthonormalise(P);  Q = sum_i M_i^T P^   (ring all-reduce)
      buf = P^ Q^T = P^ P^T sum_i M_i;  e_i = M_i - P^ Q^T / p;  keep Q for the next step

  so every rank holds the same approximation of the sum, and e_i is this rank's gradient
  minus its share of it (the paper's M_i minus the averaged approximation). Bytes:
  s (sent_elements(all_reduce, rows r') + sent_elements(all_reduce, cols r')). Here "each
  rank's decompressed payload" is P^ Q^T / p, built from the shared P^: it is not what
  `compress` alone gives, which orthonormalises the rank's own P.

`all_reduce` returns the bytes this rank sent and adds them to `bytes_sent`. It needs the
same n and dtype on every rank and host (NumPy) arrays; a one-rank group only compresses.
"""
import math
import numbers

import numpy as np

from comm import ring

COMPRESSORS = ("none", "fp16", "int8", "topk", "powersgd")
INT8_BLOCK = 256  # one scale per 256 elements: +1.6% bytes in float32, and a block's
#                   outlier only coarsens its own 256 neighbours
PAGE_BITS = 16    # top-k index pages: 2 bytes per index plus 4 per 65536 positions
POWERSGD_SEED = 0  # Q's first draw: the same on every rank, so the ring's factors agree
MAX_ELEMENTS = 2 ** 31 - 1  # indices and header sizes are int32

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # wire code = position


def make_compressor(name: str, ratio: float = 0.01, rank: int = 4,
                    momentum: float = 0.0) -> "Compressor":
    """The compressor called `name` (one of COMPRESSORS); every setting is checked, whichever
    method uses it."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}: expected one of {', '.join(COMPRESSORS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise ValueError(f"top-k ratio {ratio!r}: expected a number in (0, 1]")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"PowerSGD rank {rank!r}: expected an integer >= 1")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0 <= momentum < 1:
        raise ValueError(f"top-k momentum {momentum!r}: expected a number in [0, 1)")
    if name == "none":
        return NoneCompressor()
    if name == "fp16":
        return FP16Compressor()
    if name == "int8":
        return Int8Compressor()
    if name == "topk":
        return TopKCompressor(float(ratio), float(momentum))
    return PowerSGDCompressor(int(rank))


def topk_count(n: int, ratio: float) -> int:
    """ceil(ratio n) entries, at least 1 for n > 0. The product is shrunk by a relative 1e-12
    first, so that 0.07 * 100 = 7.000000000000001 (the decimal product is 7) keeps 7, not 8."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(ratio * n * (1 - 1e-12))))


def _check_grad(grad):
    if not isinstance(grad, np.ndarray):
        raise ValueError(f"compressors take NumPy arrays, not {type(grad).__name__}")
    if grad.ndim != 1 or grad.dtype not in _DTYPES:
        raise ValueError(f"gradient of shape {grad.shape} and dtype {grad.dtype}: expected a "
                         "1-D float32 or float64 array")
    if grad.size > MAX_ELEMENTS:
        raise ValueError(f"{grad.size} elements: at most {MAX_ELEMENTS} per key")


def _header(code, dtype, n, *sizes):
    """int32 words (method, dtype, n, sizes...), padded to a multiple of 8 bytes."""
    words = [code, _DTYPES.index(np.dtype(dtype)), n, *sizes]
    words += [0] * (len(words) % 2)
    return np.array(words, np.int32).view(np.uint8)


def _header_bytes(n_sizes):
    return 4 * (3 + n_sizes + (3 + n_sizes) % 2)


def _pack(header, arrays):
    """One uint8 message: the header, then each array's bytes."""
    parts = [header] + [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    return np.concatenate(parts)


class _Reader:
    """Reads a `_pack`ed message front to back; arrays are views into it."""

    def __init__(self, buf, code, name, n_sizes):
        buf = np.asarray(buf)
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError(f"a payload buffer is 1-D uint8, not {buf.dtype} {buf.shape}")
        size = _header_bytes(n_sizes)
        found = int(buf[:4].view(np.int32)[0]) if buf.size >= 4 else -1
        if found != code:
            what = COMPRESSORS[found] if 0 <= found < len(COMPRESSORS) else "no known"
            raise ValueError(f"buffer holds {what} payload, not a {name} payload")
        if buf.size < size:
            raise ValueError(f"payload buffer of {buf.size} bytes is truncated")
        words = buf[:size].view(np.int32)
        if not 0 <= words[1] < len(_DTYPES) or words[2] < 0:
            raise ValueError(f"{name} payload header {words.tolist()} is damaged")
        self.buf, self.pos = buf, size
        self.dtype, self.n = _DTYPES[words[1]], int(words[2])
        self.sizes = [int(w) for w in words[3:3 + n_sizes]]

    def take(self, dtype, count):
        dtype = np.dtype(dtype)
        end = self.pos + count * dtype.itemsize
        if end > self.buf.size:
            raise ValueError(f"payload buffer of {self.buf.size} bytes is truncated")
        out = self.buf[self.pos:end].view(dtype) if count else np.empty(0, dtype)
        self.pos = end
        # A view off its dtype's alignment is copied: BLAS may round differently on
        # misaligned operands (PowerSGD's P @ Q.T moved by an ulp at 1-7 bytes off on an
        # Intel Xeon's OpenBLAS), and a payload must decompress to the same bits anywhere.
        return out if out.flags.aligned else out.copy()


class Compressor:
    """What every method shares: per-key state, byte counts, and the gather-based ring."""

    name = ""
    code = -1

    def __init__(self):
        self.bytes_sent = 0  # by all_reduce, since the compressor was made
        self._state = {}     # key -> the method's per-stream state

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, {self.bytes_sent} bytes sent)"

    # -- the interface (each method fills in compress, decompress, wire_bytes, to/from_buffer)

    def compress(self, key, grad):
        """(n,) float -> payload; updates the key's state."""
        raise NotImplementedError

    def decompress(self, payload):
        """payload -> (n,) array of the gradient's dtype."""
        raise NotImplementedError

    def wire_bytes(self, n: int, dtype) -> int:
        """Bytes of the message for a gradient of n elements of `dtype`."""
        raise NotImplementedError

    def payload_bytes(self, payload) -> int:
        """Bytes on the wire for this payload (its `to_buffer` length)."""
        n, dtype = self._size_of(payload)
        return self.wire_bytes(n, dtype)

    def to_buffer(self, payload) -> np.ndarray:
        """payload -> one 1-D uint8 message, header included."""
        raise NotImplementedError

    def from_buffer(self, buf):
        """A `to_buffer` message -> payload (views into buf, or copies where buf's offset
        misaligns them: decompress before reusing buf)."""
        raise NotImplementedError

    def residual(self, key):
        """The key's error-feedback residual (a copy), or None where there is none."""
        return None

    # -- the ring

    def all_reduce(self, comm, key, buf, segment_bytes=ring.DEFAULT_SEGMENT_BYTES) -> int:
        """buf (n,) -> in place: sum over the ranks of their decompressed payloads. Returns
        the bytes this rank sent: (p-1) payload bytes, through one ring all-gather."""
        p, r = comm.Get_size(), comm.Get_rank()
        payload = self.compress(key, buf)
        if p == 1:
            buf[...] = self.decompress(payload)
            return 0
        mine = self.to_buffer(payload)
        size = mine.size
        slots = np.empty(p * size, np.uint8)
        slots[r * size:(r + 1) * size] = mine
        ring.all_gather(comm, slots, segment_bytes)
        buf[...] = 0
        for q in range(p):  # rank order on every rank: every rank gets the same bits
            self._add_into(buf, self.from_buffer(slots[q * size:(q + 1) * size]))
        sent = ring.sent_elements("all_gather", p * size, p, r)
        self.bytes_sent += sent
        return sent

    def all_reduce_bytes(self, n: int, dtype, p: int, r: int) -> int:
        """Bytes rank r of p sends in `all_reduce` of n elements of `dtype`."""
        return ring.sent_elements("all_gather", p * self.wire_bytes(n, dtype), p, r)

    # -- helpers

    def _add_into(self, out, payload):
        out += self.decompress(payload)

    def _size_of(self, payload):
        """(n, dtype) of the gradient a payload stands for."""
        raise NotImplementedError

    def _stream(self, key, grad, make):
        """The key's state, made by `make()` on first use; the key must keep its n and dtype."""
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = (grad.size, grad.dtype, make())
        elif state[:2] != (grad.size, grad.dtype):
            raise ValueError(f"{self.name} key {key!r}: gradient of {grad.size} {grad.dtype}, "
                             f"but the key was first used with {state[0]} {state[1]}")
        return state[2]


class NoneCompressor(Compressor):
    """The gradient as it is."""

    name, code = "none", 0

    def compress(self, key, grad):
        """(n,) -> the same array, not a copy."""
        _check_grad(grad)
        return grad

    def decompress(self, payload):
        return payload

    def wire_bytes(self, n, dtype):
        return _header_bytes(0) + n * np.dtype(dtype).itemsize

    def _size_of(self, payload):
        return payload.size, payload.dtype

    def to_buffer(self, payload):
        return _pack(_header(self.code, payload.dtype, payload.size), [payload])

    def from_buffer(self, buf):
        reader = _Reader(buf, self.code, self.name, 0)
        return reader.take(reader.dtype, reader.n)

    def all_reduce(self, comm, key, buf, segment_bytes=ring.DEFAULT_SEGMENT_BYTES):
        """The plain ring all-reduce: 2(p-1)/p of buf's bytes."""
        _check_grad(buf)
        ring.all_reduce(comm, buf, segment_bytes)
        sent = self.all_reduce_bytes(buf.size, buf.dtype, comm.Get_size(), comm.Get_rank())
        self.bytes_sent += sent
        return sent

    def all_reduce_bytes(self, n, dtype, p, r):
        return ring.sent_elements("all_reduce", n, p, r) * np.dtype(dtype).itemsize


class FP16Compressor(Compressor):
    """float16 after an exact power-of-two scale; payload (exponent e, float16 array, dtype)."""

    name, code = "fp16", 1

    def compress(self, key, grad):
        _check_grad(grad)
        peak = float(np.max(np.abs(grad))) if grad.size else 0.0
        # frexp: peak = m 2^E with m in [0.5, 1), so peak 2^-(E-15) lies in [2^14, 2^15)
        e = math.frexp(peak)[1] - 15 if peak > 0 else 0
        half = np.empty(grad.size, np.float16)
        factor = _power_of_two(-e, grad.dtype)
        if factor is None:
            half[...] = np.ldexp(grad, -e)
        else:  # the same bits, 20x faster than ldexp
            np.multiply(grad, factor, out=half, casting="unsafe")
        return e, half, grad.dtype

    def decompress(self, payload):
        e, half, dtype = payload
        out = half.astype(dtype)
        factor = _power_of_two(e, dtype)
        if factor is None:
            return np.ldexp(out, e)
        out *= factor
        return out

    def wire_bytes(self, n, dtype):
        return _header_bytes(1) + 2 * n

    def _size_of(self, payload):
        return payload[1].size, payload[2]

    def to_buffer(self, payload):
        e, half, dtype = payload
        return _pack(_header(self.code, dtype, half.size, e), [half])

    def from_buffer(self, buf):
        reader = _Reader(buf, self.code, self.name, 1)
        return reader.sizes[0], reader.take(np.float16, reader.n), reader.dtype


def _power_of_two(e, dtype):
    """2^e as a normal number of `dtype` (multiplying by it is exact), or None."""
    info = np.finfo(dtype)
    return dtype.type(2.0 ** e) if info.minexp <= e <= info.maxexp - 1 else None


class Int8Compressor(Compressor):
    """int8 with a scale per block; payload (n, scales (blocks,), q (n,) int8)."""

    name, code = "int8", 2

    def __init__(self, block: int = INT8_BLOCK, error_feedback: bool = False):
        super().__init__()
        if not block >= 1:
            raise ValueError(f"int8 block of {block!r} elements: expected an integer >= 1")
        self.block = int(block)
        self.error_feedback = error_feedback

    def compress(self, key, grad):
        _check_grad(grad)
        n, B = grad.size, self.block
        blocks = -(-n // B)
        x = np.zeros(blocks * B, grad.dtype)
        x[:n] = grad
        if self.error_feedback:
            x[:n] += self._stream(key, grad, lambda: np.zeros(n, grad.dtype))
        x = x.reshape(blocks, B)
        scales = np.abs(x).max(axis=1) / 127 if blocks else np.zeros(0, grad.dtype)
        # scales rounded down still give |x| / scale <= 127 (1 + ulp): round() keeps 127
        safe = np.where(scales > 0, scales, 1)
        q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
        payload = (n, scales, q)
        if self.error_feedback:
            residual = self._state[key][2]
            residual[...] = x.reshape(-1)[:n] - self.decompress(payload)
        return payload

    def decompress(self, payload):
        n, scales, q = payload
        out = np.zeros(scales.size * self.block, scales.dtype)
        out[:n] = q
        out = out.reshape(scales.size, self.block)
        out *= scales[:, None]
        return out.reshape(-1)[:n]

    def residual(self, key):
        state = self._state.get(key)
        return None if state is None else state[2].copy()

    def wire_bytes(self, n, dtype):
        return _header_bytes(1) + np.dtype(dtype).itemsize * -(-n // self.block) + n

    def _size_of(self, payload):
        return payload[0], payload[1].dtype

    def to_buffer(self, payload):
        n, scales, q = payload
        return _pack(_header(self.code, scales.dtype, n, self.block), [scales, q])

    def from_buffer(self, buf):
        reader = _Reader(buf, self.code, self.name, 1)
        if reader.sizes[0] != self.block:
            raise ValueError(f"int8 payload of blocks of {reader.sizes[0]}, this compressor "
                             f"uses {self.block}")
        scales = reader.take(reader.dtype, -(-reader.n // self.block))
        return reader.n, scales, reader.take(np.int8, reader.n)


class TopKCompressor(Compressor):
    """The ceil(ratio n) largest magnitudes with error feedback (and DGC momentum when
    momentum > 0); payload (n, indices (k,) int32 ascending, values (k,))."""

    name, code = "topk", 3

    def __init__(self, ratio: float = 0.01, momentum: float = 0.0):
        super().__init__()
        self.ratio, self.momentum = ratio, momentum

    def compress(self, key, grad):
        _check_grad(grad)
        n = grad.size
        k = topk_count(n, self.ratio)
        v, u = self._stream(key, grad, lambda: (np.zeros(n, grad.dtype),
                                                np.zeros(n, grad.dtype) if self.momentum else None))
        if u is not None:  # DGC momentum correction: accumulate the velocity, not g
            u *= self.momentum
            u += grad
            v += u
        else:
            v += grad
        idx = np.sort(np.argpartition(np.abs(v), n - k)[n - k:]).astype(np.int32) if k else \
            np.zeros(0, np.int32)
        values = v[idx]  # fancy indexing: a copy, taken before v is zeroed there
        v[idx] = 0
        if u is not None:
            u[idx] = 0  # momentum factor masking: sent velocity does not keep pushing
        return n, idx, values

    def decompress(self, payload):
        n, idx, values = payload
        out = np.zeros(n, values.dtype)
        out[idx] = values
        return out

    def _add_into(self, out, payload):
        _, idx, values = payload
        out[idx] += values  # indices are distinct within a payload

    def residual(self, key):
        state = self._state.get(key)
        return None if state is None else state[2][0].copy()

    def wire_bytes(self, n, dtype):
        k = topk_count(n, self.ratio)
        pages = -(-n // (1 << PAGE_BITS))
        return _header_bytes(1) + k * (np.dtype(dtype).itemsize + 2) + 4 * pages

    def _size_of(self, payload):
        return payload[0], payload[2].dtype

    def to_buffer(self, payload):
        n, idx, values = payload
        pages = -(-n // (1 << PAGE_BITS))
        counts = np.bincount(idx >> PAGE_BITS, minlength=pages).astype(np.uint32)
        low = (idx & ((1 << PAGE_BITS) - 1)).astype(np.uint16)
        return _pack(_header(self.code, values.dtype, n, idx.size), [values, counts, low])

    def from_buffer(self, buf):
        reader = _Reader(buf, self.code, self.name, 1)
        n, k = reader.n, reader.sizes[0]
        values = reader.take(reader.dtype, k)
        counts = reader.take(np.uint32, -(-n // (1 << PAGE_BITS)))
        low = reader.take(np.uint16, k)
        pages = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
        return n, (pages << PAGE_BITS) | low.astype(np.int32), values


def _matrix_shape(n):
    """(rows, cols) of the zero-padded matrix view: cols = ceil(sqrt n), rows <= cols."""
    cols = math.isqrt(n)
    cols += cols * cols < n
    return (-(-n // cols) if n else 0), cols


def _orthonormalise(P):
    """(rows, r) -> (rows, r) with orthonormal columns spanning at least P's columns."""
    return np.linalg.qr(P)[0] if P.size else P


class PowerSGDCompressor(Compressor):
    """Rank-r PowerSGD with error feedback and a warm-started Q per key; payload (n, P^, Q)."""

    name, code = "powersgd", 4

    def __init__(self, rank: int = 4, seed: int = POWERSGD_SEED):
        super().__init__()
        self.rank, self.seed = rank, seed

    def shape(self, n):
        """(rows, cols, r') of the matrix view of n elements: r' = min(rank, rows)."""
        rows, cols = _matrix_shape(n)
        return rows, cols, min(self.rank, rows)

    def compress(self, key, grad):
        _check_grad(grad)
        return self._power_step(key, grad, None, 1)

    def all_reduce(self, comm, key, buf, segment_bytes=ring.DEFAULT_SEGMENT_BYTES):
        """The paper's all-reduce scheme (module docstring): two ring all-reduces, of P and
        of Q; buf becomes P^ Q^T, the same on every rank."""
        _check_grad(buf)
        p, r = comm.Get_size(), comm.Get_rank()

        def reduce(x):
            ring.all_reduce(comm, x.reshape(-1), segment_bytes)

        _, P, Q = self._power_step(key, buf, reduce if p > 1 else None, p)
        buf[...] = self.decompress((buf.size, P, Q))
        sent = self.all_reduce_bytes(buf.size, buf.dtype, p, r)
        self.bytes_sent += sent
        return sent

    def _power_step(self, key, grad, reduce, p):
        """One power iteration on M = pad(grad + residual); `reduce` sums over the ranks in
        place (None: this rank alone). Keeps Q and the residual M - P^ Q^T / p."""
        n = grad.size
        rows, cols, r = self.shape(n)

        def fresh():
            Q = np.random.default_rng(self.seed).standard_normal((cols, r)).astype(grad.dtype)
            return np.zeros(n, grad.dtype), Q

        state = self._stream(key, grad, lambda: list(fresh()))
        residual, Q = state
        M = np.zeros(rows * cols, grad.dtype)
        M[:n] = grad
        M[:n] += residual
        M = M.reshape(rows, cols)
        P = M @ Q
        if reduce:
            reduce(P)
        P = np.ascontiguousarray(_orthonormalise(P))
        Q = M.T @ P
        if reduce:
            reduce(Q)
        approx = (P @ Q.T).reshape(-1)[:n]
        if p > 1:
            approx /= p  # this rank's share of the summed approximation
        residual[...] = M.reshape(-1)[:n] - approx
        state[1] = Q
        return n, P, Q

    def decompress(self, payload):
        n, P, Q = payload
        return (P @ Q.T).reshape(-1)[:n] if n else np.zeros(0, P.dtype)

    def residual(self, key):
        state = self._state.get(key)
        return None if state is None else state[2][0].copy()

    def wire_bytes(self, n, dtype):
        rows, cols, r = self.shape(n)
        return _header_bytes(3) + np.dtype(dtype).itemsize * r * (rows + cols)

    def all_reduce_bytes(self, n, dtype, p, r):
        rows, cols, rk = self.shape(n)
        return np.dtype(dtype).itemsize * (ring.sent_elements("all_reduce", rows * rk, p, r)
                                           + ring.sent_elements("all_reduce", cols * rk, p, r))

    def _size_of(self, payload):
        return payload[0], payload[1].dtype

    def to_buffer(self, payload):
        n, P, Q = payload
        rows, cols, r = self.shape(n)
        return _pack(_header(self.code, P.dtype, n, rows, cols, r), [P, Q])

    def from_buffer(self, buf):
        reader = _Reader(buf, self.code, self.name, 3)
        rows, cols, r = reader.sizes
        P = reader.take(reader.dtype, rows * r).reshape(rows, r)
        return reader.n, P, reader.take(reader.dtype, cols * r).reshape(cols, r)
