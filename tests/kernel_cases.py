"""Inputs and checks shared by the kernel tests (interpreter on CPU, and CUDA).

The reference is always the codec's PyTorch method run on the CPU: its bytes are the definition
(torch's CPU and CUDA conversions disagree on NaN bit patterns, see tpcomp_megatron/kernels/numerics.py).
"""

from __future__ import annotations

import torch

from tpcomp_megatron.codecs import FORMATS, REDUCED, OutlierParams, make_codec


def hard_input(rows: int, hidden: int, block: int, dtype: torch.dtype, gen: torch.Generator,
               *, nonfinite: bool = True, fmt: str | None = None) -> torch.Tensor:
    """Random rows whose blocks cover the cases that break codecs: per-row magnitudes from 1e-4 to
    1e4, an all-zero block, huge / tiny / subnormal-range blocks, a block of exact rounding ties
    (midpoints of the element grid times a power of two), a lone outlier, NaN, +Inf and -Inf."""
    x = torch.randn(rows, hidden, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen) * 3)
    nb = hidden // block
    cells = [(r, b) for r in range(rows) for b in range(nb)]
    perm = torch.randperm(len(cells), generator=gen).tolist()
    specials = ["zero", "huge", "tiny", "subnormal", "ties", "outlier", "mixed"]
    if nonfinite:
        specials += ["nan", "inf", "-inf"]
    for kind, idx in zip(specials, perm):
        r, b = cells[idx]
        sl = slice(b * block, (b + 1) * block)
        if kind == "zero":
            x[r, sl] = 0.0
        elif kind == "huge":
            x[r, sl] *= 1e30
        elif kind == "tiny":
            x[r, sl] *= 1e-30
        elif kind == "subnormal":
            x[r, sl] *= 1e-39
        elif kind == "ties" and fmt is not None:
            x[r, sl] = _ties(FORMATS[fmt], block, gen)
        elif kind == "outlier":
            x[r, b * block] = 1e4
        elif kind == "mixed":  # huge and tiny in one block: tiny values underflow after scaling
            x[r, sl] *= 1e-30
            x[r, b * block] = 3e30
        elif kind == "nan":
            x[r, b * block + 1] = float("nan")
        elif kind in ("inf", "-inf"):
            x[r, b * block + block // 2] = float(kind)
    return x.to(dtype)


def _ties(fmt, block: int, gen: torch.Generator) -> torch.Tensor:
    """A block of midpoints between adjacent grid values (ties), scaled so amax hits max_value."""
    codes = torch.arange(fmt.max_code + 1)
    grid = fmt.code_to_value(codes)
    mids = (grid[1:] + grid[:-1]) / 2
    pick = mids[torch.randint(0, mids.numel(), (block,), generator=gen)]
    pick = pick * torch.where(torch.rand(block, generator=gen) < 0.5, -1.0, 1.0)
    pick[0] = fmt.max_value  # fixes the block scale at 1 (E8M0) or exactly 1 (bf16)
    return pick * 2.0 ** int(torch.randint(-4, 5, (1,), generator=gen))


def outlier_params(hidden: int, world: int, ratio: int, gen: torch.Generator) -> OutlierParams:
    """Calibrated-looking parameters: per-source ranges with ~1 channel in `ratio` 30x wider."""
    k = -(-hidden // ratio)
    scale = torch.rand(hidden, generator=gen) * 3 + 0.1
    chans = torch.randperm(hidden, generator=gen)[:k].sort().values
    scale[chans] *= 30
    src = torch.randn(world + 1, 256, hidden, generator=gen) * scale
    return OutlierParams.from_stats(src.amin(1), src.amax(1), chans)


def outlier_input(rows: int, params: OutlierParams, source: int, dtype, gen, *, nonfinite: bool = True):
    """Rows inside and a little outside the calibrated range of `source`, outliers included."""
    lo, step = params.lo[source], params.step[source]
    span = step * 15
    x = lo + span * (torch.rand(rows, params.hidden, generator=gen) * 1.2 - 0.1)
    x[:, params.channels] = torch.randn(rows, params.channels.numel(), generator=gen) * 100
    if nonfinite and rows >= 3:
        x[1, 3] = float("nan")
        x[2, int(params.channels[0])] = float("inf")  # in an outlier channel only
        x[0, 5] = float("-inf")
    return x.to(dtype)


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bitwise equality (payload bytes, or float outputs bit for bit) with NaN matching NaN."""
    got, want = got.cpu(), want.cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.dtype == torch.uint8:
        return torch.equal(got, want)
    gn, wn = torch.isnan(got), torch.isnan(want)
    ibits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    return torch.equal(gn, wn) and torch.equal(torch.where(gn, 0, got).view(ibits), torch.where(wn, 0, want).view(ibits))


def describe(got: torch.Tensor, want: torch.Tensor) -> str:
    got, want = got.cpu(), want.cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    diff = (got != want) & ~(torch.isnan(got.float()) & torch.isnan(want.float()))
    where = diff.nonzero()[:5].tolist()
    return f"{int(diff.sum())} differ, first at {where}: got {[got[tuple(i)].item() for i in where]}, want {[want[tuple(i)].item() for i in where]}"


def check_all_ops(K, codec, xs: list[torch.Tensor], hidden: int, device: str, dtypes, sources=None) -> None:
    """encode each x, then decode_sum / decode_each (every dtype in `dtypes`) and decode_sum_encode
    of the payloads, all against the CPU reference. Raises AssertionError with a diagnosis."""
    n = len(xs)
    sources = list(range(n)) if sources is None else sources
    payloads = []
    for x, src in zip(xs, sources):
        want = codec.encode(x, source=src)
        got = K.encode(codec, x.to(device), source=src)
        assert same(got, want), f"encode {x.dtype} source {src}: {describe(got, want)}"
        payloads.append(want)
    p = torch.stack(payloads)
    pd = p.to(device)
    for dtype in dtypes:
        want = codec.decode_sum(p, hidden, sources, dtype=dtype)
        got = K.decode_sum(codec, pd, hidden, sources=sources, dtype=dtype)
        assert same(got, want), f"decode_sum n={n} {dtype}: {describe(got, want)}"
        want = torch.cat([codec.decode(q, hidden, source=s, dtype=dtype) for q, s in zip(p, sources)])
        got = K.decode_each(codec, pd, hidden, sources=sources, dtype=dtype)
        assert same(got, want), f"decode_each n={n} {dtype}: {describe(got, want)}"
    want = codec.encode(codec.decode_sum_f32(p, hidden, sources), source=REDUCED)
    got = K.decode_sum_encode(codec, pd, hidden, sources=sources, out_source=REDUCED)
    assert same(got, want), f"decode_sum_encode n={n}: {describe(got, want)}"
    # the two-shot tail: every rank decodes the reduced chunks with the REDUCED parameters
    reduced = torch.stack([want] * 2)
    got = K.decode_each(codec, reduced.to(device), hidden, sources=[REDUCED] * 2, dtype=torch.bfloat16)
    want = torch.cat([codec.decode(q, hidden, source=REDUCED, dtype=torch.bfloat16) for q in reduced])
    assert same(got, want), f"decode_each of reduced payloads: {describe(got, want)}"


BLOCK_CASES = [  # (block, scale, rows, hidden)
    (32, "e8m0", 17, 640), (8, "bf16", 3, 96), (16, "e8m0", 1, 576), (128, "bf16", 5, 640),
    (64, "e8m0", 3, 576), (32, "e8m0up", 9, 640), (8, "e8m0up", 2, 96), (16, "e6m2", 7, 576),
    (32, "e6m2d", 17, 640), (8, "e6m2d", 3, 384),
]


def e6m2_boundary_rows(codec, gen: torch.Generator) -> torch.Tensor:
    """One block a row (block 8), maxima whose product with fp32(1 / max_value) lands on or beside
    a rounding tie of the 2-bit scale mantissa (1.125, 1.375, 1.625, 1.875: even mantissa wins,
    1.875 carries into the exponent), at the bottom of the range (2**-32, below it, subnormal,
    zero) and past the top; the other values of a row anywhere below its maximum."""
    rcp = torch.tensor(1.0 / codec.fmt.max_value, dtype=torch.float32)
    maxima = []
    for q in (1.0, 1.125, 1.375, 1.625, 1.875):
        for e in (-33, -32, -1, 0, 7, 31, 32):
            up = down = torch.tensor(q * 2.0**e, dtype=torch.float32) / rcp
            maxima.append(up)
            for _ in range(3):  # 3 floats either side: one of them hits q * 2**e or straddles it
                up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
                maxima += [up, down]
    maxima = torch.stack(maxima + [torch.tensor(3.0e38), torch.tensor(1e-45), torch.tensor(0.0)])
    rows = torch.rand(len(maxima), 8, generator=gen) * 0.9 * maxima[:, None]
    rows[:, 5] = maxima * torch.where(torch.rand(len(maxima), generator=gen) < 0.5, -1.0, 1.0)
    return rows


def block_codec(element: str, block: int, scale: str):
    return make_codec(f"{element}/b{block}/{scale}")


def lowrank_bases(hidden: int, world: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Calibrated-looking bases `[world + 1, rank, hidden]`: orthonormal rows per source, each
    direction concentrated on a few channels (as partial sums' shared directions are)."""
    raw = torch.randn(world + 1, hidden, rank, generator=gen) * torch.rand(world + 1, hidden, 1, generator=gen).pow(8)
    return torch.linalg.qr(raw).Q.transpose(1, 2).contiguous()


def lowrank_input(rows: int, bases: torch.Tensor, source: int, dtype, gen, *, nonfinite: bool = True):
    """Rows with large coordinates on `source`'s directions plus a smaller full-rank part."""
    b = bases[source]
    x = torch.randn(rows, b.shape[0], generator=gen) * 50 @ b + torch.randn(rows, b.shape[1], generator=gen)
    if nonfinite and rows >= 3:
        x[1, 3] = float("nan")
        x[2, 7] = float("inf")
    return x.to(dtype)


def check_encode_feedback(K, codec, x: torch.Tensor, debt: torch.Tensor, source: int, device: str) -> None:
    """The fused error-feedback encode against the reference's unfused steps: the payload of
    x + debt, and the new debt (x + debt minus what that payload decodes to), bit for bit."""
    send = x.float() + debt
    want_payload = codec.encode(send, source=source)
    want_debt = send - codec.decode_f32(want_payload, x.shape[1], source=source)
    got_debt = debt.clone().to(device)
    got_payload = K.encode_feedback(codec, x.to(device), got_debt, source=source)
    assert same(got_payload, want_payload), f"encode_feedback payload {x.dtype}: {describe(got_payload, want_payload)}"
    assert same(got_debt, want_debt), f"encode_feedback debt {x.dtype}: {describe(got_debt, want_debt)}"


def feedback_debt(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A float32 debt a few percent of x's magnitude (finite where x is), with one NaN."""
    d = torch.randn(x.shape, generator=gen) * 0.05 * torch.nan_to_num(x.float(), nan=1.0, posinf=1.0, neginf=1.0)
    d[0, -1] = float("nan")
    return d.contiguous()


def check_eager_matches_custom_ops(K, codec, xs: list[torch.Tensor], hidden: int, device: str, *,
                                   feedback: bool = False) -> list:
    """The eager plans (the public functions, each called twice: built, then replayed) against
    the custom ops' path (`api._traced_*`, what torch.compile runs): identical bytes and bits for
    encode, decode_sum, decode_each, decode_sum_encode and (`feedback`) encode_feedback. Returns
    the plans it used (their `launches`, for a CUDA test to check the direct launch)."""
    from tpcomp_megatron.kernels.plans import memo

    n = len(xs)
    xs = [x.to(device) for x in xs]
    ref = [K.api._traced_encode(codec, x, s) for s, x in enumerate(xs)]
    for _ in range(2):
        for s, x in enumerate(xs):
            assert same(K.encode(codec, x, source=s), ref[s]), f"{codec.spec}: eager encode, source {s}"
    p = torch.stack(ref)
    for mode, dtype, out_source in (("sum", torch.bfloat16, 0), ("sum", torch.float32, 0),
                                    ("each", torch.float16, 0), ("encode", torch.float32, REDUCED)):
        want = K.api._traced_decode(codec, p, hidden, range(n), dtype, mode, out_source)
        for _ in range(2):
            got = K.api._decode(codec, p, hidden, range(n), dtype, mode, out_source)
            assert same(got, want), f"{codec.spec}: eager decode {mode} {dtype}: {describe(got, want)}"
    if feedback:
        debt0 = feedback_debt(xs[0].cpu(), torch.Generator().manual_seed(n)).to(device)
        d_ref = debt0.clone()
        want = K.api._traced_encode_feedback(codec, xs[0], d_ref, 0)
        d_got = debt0.clone()
        got = K.encode_feedback(codec, xs[0], d_got, source=0)
        assert same(got, want) and same(d_got, d_ref), f"{codec.spec}: eager encode_feedback"
    return list(memo(codec).values())
