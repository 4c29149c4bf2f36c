"""Launch settings shared by the kernels: format constants, tile shapes, index width.

Tile policy. A tile is `R` rows x `T` columns, about `GPU_TILE_ELEMS` elements, several blocks
of a row per program, with one warp per 1024 elements (32 per thread). `T` is the power of two
(at least `unit`, at most `GPU_MAX_T`) that pads the row least (ties: the larger); a row whose
length is not a power of two gets exact tiles where some power of two divides it (5120 -> 1024,
576 -> 64). Measured on H100 (benchmarks/results/kernels_tune_h100_2026-11-23*.jsonl):
2048-element tiles on 2 warps match or beat 8192 on 8 warps at every size from 8 to 128 MB (FP4
encode 0.68 vs 0.63 of copy at 8 MB, 0.83 vs 0.81 at 128 MB; INT4 encode 0.77 vs 0.67 at 8 MB);
fewer elements per thread lose (2048 on 4 warps: 0.75 at 128 MB), and so does a program that
loops over 2-8 row tiles, loading the next while it quantizes the current one (an experiment
not kept: kernels_tune_h100_2026-11-24-steps.jsonl; FP4 encode at 8 MB 0.68 with 2 tiles vs
0.60 with one, which measured 0.66 in the day's two other runs, 0.46-0.58 with 4-8 tiles; equal
or worse everywhere else). The hybrid and static-outlier
kernels pass their own sizes (block.py `_choose`, outlier.py `_tiles`). Under TRITON_INTERPRET=1
the cost is per program, not per byte, so CPU tensors get one tile as wide as the row and as
many rows as fit `CPU_TILE_ELEMS`.

Launches (`Launcher`). Every launch can go through Triton's JIT, `kernel[grid](...)`, its public
API, on any Triton the package installs with (setup.py: `triton>=3.0,<3.10`; tested: 3.6.0 on
H100 / H200 with torch 2.11, 3.9.0 under TRITON_INTERPRET=1 on CPU with torch 2.13). The fast
launch hands the tensors straight to the binary the JIT compiled, skipping its per-call binding,
specialization and cache lookup (170-345 us of host time per call down to 12-19 us,
benchmarks/results/host_overhead_2026-12-06.md). It relies on Triton internals: the JIT
returning the `CompiledKernel` it launched, `CompiledKernel.run` (the launcher, called as
`(gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata, enter_hook,
exit_hook, *every kernel argument, constexprs included, in signature order)`), `.function`,
`.packed_metadata`, `._init_handles()`, `triton.knobs.runtime.launch_enter_hook` (a profiler's
hook: then the JIT, which calls it), `triton.runtime.driver.active.get_current_stream`, and, where
it matches exactly, the C function behind the CUDA launcher (`_c_launch`). So it is used only
behind one capability check, `fast_launch_supported()`, evaluated once per process: the Triton
version in `FAST_LAUNCH_TRITON` (>= 3.6, < 3.7: the versions it was checked on, bit for bit and
for time, on the GPUs) and those internals present; elsewhere (another Triton, the interpreter, a
CPU tensor, an unaligned tensor, a launch hook) every launch takes the JIT, with the same binary
and the same bytes, only more host time. A new Triton gets the fast launch by adding its range
here after tests/gpu/test_kernels_cuda.py passes on it (its plan tests assert the binaries are
taken over).
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from tpcomp_megatron.codecs.formats import ElementFormat

GPU_TILE_ELEMS = 2048
GPU_MAX_T = 1024
CPU_TILE_ELEMS = 1 << 16
INT32_LIMIT = (1 << 31) - 1

# Every kernel is launched without fused multiply-add: the reference rounds `x * inv` before the
# element rounding, and a contraction into the following add would skip that rounding.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@lru_cache(maxsize=None)
def format_constexprs(fmt: ElementFormat) -> dict:
    """The kernels' compile-time description of an element format (derived from the reference)."""
    return {
        "BITS": fmt.bits, "EBITS": fmt.ebits, "MBITS": fmt.mbits, "BIAS": fmt.bias,
        "MAX_CODE": fmt.max_code, "EMAX": fmt.emax, "MAXV": float(fmt.max_value),
        "DEC_MUL": 2.0 ** (127 - fmt.bias) if fmt.ebits else 1.0,
        "LEVELS": tuple(fmt.levels),  # () but for codebook formats
    }


@dataclass(frozen=True)
class Tiles:
    rows: int  # R: rows per program (power of two)
    cols: int  # T: columns per program or per loop step (power of two)
    num_warps: int


def choose_tiles(rows: int, hidden: int, unit: int, on_gpu: bool, *, max_t: int = GPU_MAX_T,
                 elems: int = GPU_TILE_ELEMS) -> Tiles:
    """Tile for a `[rows, hidden]` problem whose column tiles must be multiples of `unit`."""
    if not on_gpu:
        t = max(unit, min(_pow2_ceil(hidden), 1 << 14))
        r = max(1, min(_pow2_ceil(rows), CPU_TILE_ELEMS // t))
        return Tiles(r, t, 4)
    best = unit
    t = unit
    while t <= max(unit, min(max_t, _pow2_ceil(hidden))):
        if -(-hidden // t) * t <= -(-hidden // best) * best:
            best = t
        t *= 2
    r = max(1, min(_pow2_ceil(rows), elems // best))
    return Tiles(r, best, max(1, min(8, r * best // 1024)))


def needs_int64(*numels: int) -> bool:
    """Whether some byte or element offset can pass 2**31 - 1 (then indices are int64)."""
    return max(numels) > INT32_LIMIT


def out_kind_of(dtype: torch.dtype, on_gpu: bool) -> int:
    """Output dtype -> the kernels' OUT_KIND constant (see numerics._store_output): bf16 is
    rounded by hand only under the interpreter (CPU tensors)."""
    if dtype == torch.bfloat16:
        return 3 if on_gpu else 1
    return {torch.float32: 0, torch.float16: 2}[dtype]


def out_kind(out: torch.Tensor) -> int:
    return out_kind_of(out.dtype, out.is_cuda)


def slots_even(payload: torch.Tensor, slots_off: int) -> bool:
    """Whether every bf16 slot of a payload `[..., row_bytes]` starts at an even address (then
    the kernels move slots as 16-bit values)."""
    return payload.data_ptr() % 2 == 0 and payload.shape[-1] % 2 == 0 and slots_off % 2 == 0


# -- the fast launch: Triton internals behind one capability check (module docstring) -----------
FAST_LAUNCH_TRITON = ((3, 6), (3, 7))
"""Triton versions [from, to) the fast launch was tested on (3.6.0: H100 and H200, torch 2.11)."""
_KNOBS = getattr(triton, "knobs", None)
_ALIGN = 16  # Triton specializes pointer arguments on 16-byte alignment


def triton_version(text: str) -> tuple[int, ...] | None:
    """'3.6.0' (or '3.6.0+git1234', '3.7.0rc1') -> (3, 6, 0); None when it does not start with a version."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return None if m is None else tuple(int(g) for g in m.groups() if g is not None)


def fast_launch_problem() -> str | None:
    """Why the fast launch is off with the Triton imported now (None: it is on): a version outside
    `FAST_LAUNCH_TRITON`, or an internal it uses missing. Evaluated afresh on each call (tests);
    the launches ask `fast_launch_supported()`, which keeps the first answer."""
    version = getattr(triton, "__version__", "")
    v = triton_version(version)
    lo, hi = FAST_LAUNCH_TRITON
    if v is None or not lo <= v[:2] < hi:
        return (f"Triton {version or '(no version)'} is outside the versions the fast launch was tested on "
                f"(>= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]})")
    knobs = getattr(triton, "knobs", None)
    if not hasattr(getattr(knobs, "runtime", None), "launch_enter_hook"):
        return "triton.knobs.runtime.launch_enter_hook is missing"
    if not hasattr(getattr(triton, "runtime", None), "driver"):
        return "triton.runtime.driver is missing"
    try:
        from triton.compiler.compiler import CompiledKernel
    except ImportError:
        return "triton.compiler.compiler.CompiledKernel is missing"
    if not callable(getattr(CompiledKernel, "_init_handles", None)):
        return "CompiledKernel._init_handles is missing"
    return None


@functools.cache
def fast_launch_supported() -> bool:
    """Whether `Launcher` may take over the binaries the JIT compiles (`fast_launch_problem`),
    decided once per process."""
    return fast_launch_problem() is None


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's): then the JIT path, which calls it."""
    hook = _KNOBS.runtime.launch_enter_hook
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)  # a HookChain (Triton >= 3.5): set when it holds a call
    return calls is None or bool(calls)


class Launcher:
    """One kernel launch over rows with everything but its tensors and its row count fixed: grid
    columns, scalars, constexprs (tile shape, index width: a row *bucket*, `codecs.base.row_bucket`),
    and (keyed by whoever builds it) the device.

    `launch(*tensors)` launches for the rows it was built for; `launch.run(rows, *tensors)` for
    any row count of its bucket: the grid's first dimension is `cdiv(rows, row_tile)` and the
    scalars at `row_scalars` ((index, factor), ...) are `rows * factor` (the row count itself, a
    payload stride), so a new prompt length launches with no new set-up.

    The first call of each specialization goes through Triton's JIT (`kernel[grid](...)`), which
    compiles or finds the binary and returns it. Later calls hand the tensors straight to that
    binary's launcher, skipping the JIT's per-call binding, specialization and cache lookup (most
    of a launch's host time; same binary, same arguments, so the same bytes). Triton specializes
    integer arguments on being 1 and on divisibility by 16, and pointers on 16-byte alignment: a
    binary is kept per specialization of the row-dependent scalars, and a call with an unaligned
    tensor, with a launch hook set (a profiler), under the interpreter or on CPU tensors takes the
    JIT again. Without `fast_launch_supported()` (another Triton) no binary is taken over: every
    call takes the JIT.
    """

    __slots__ = ("kernel", "grid", "scalars", "constexprs", "options", "rows", "row_tile", "row_scalars", "binaries",
                 "tail_const")

    def __init__(self, kernel, grid: tuple[int, ...], scalars: tuple, constexprs: dict, options: dict, *,
                 rows: int = 0, row_tile: int = 0, row_scalars: tuple = ()):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.scalars = scalars
        self.constexprs = constexprs
        self.options = options
        self.rows = rows  # the row count `__call__` launches for
        self.row_tile = row_tile  # rows per program (0: the grid does not follow the rows)
        self.row_scalars = tuple(row_scalars)
        self.binaries: dict = {}  # specialization of the row scalars -> (compiled, head, stream, device)
        self.tail_const = None  # the constexpr values, in the kernel's argument order

    @property
    def compiled(self):
        """A compiled binary this launcher took over (None before the first JIT launch)."""
        return next((b[0] for b in self.binaries.values()), None)

    def __call__(self, *tensors: torch.Tensor) -> None:
        self.run(self.rows, *tensors)

    def run(self, rows: int, *tensors: torch.Tensor) -> None:
        scalars, spec = self.scalars, 0
        if self.row_scalars:
            scalars = list(scalars)
            for i, factor in self.row_scalars:
                v = rows * factor
                scalars[i] = v
                spec = spec * 8 + (v == 1) + 2 * (v % 16 == 0) + 4 * (v > INT32_LIMIT)
        g0 = -(-rows // self.row_tile) if self.row_tile else self.grid[0]
        binary = self.binaries.get(spec)
        if binary is not None and not _hooked():
            aligned = 0
            for t in tensors:
                aligned |= t.data_ptr()
            if not aligned % _ALIGN:
                compiled, head, stream, device = binary
                g = self.grid
                if head is not None:
                    launch, extra = head
                    launch(g0, g[1], g[2], stream(device), compiled.function, *extra,
                           compiled.packed_metadata, None, None, None, *tensors, *scalars, *self.tail_const)
                else:
                    compiled.run(g0, g[1], g[2], stream(device), compiled.function,
                                 compiled.packed_metadata, None, None, None, *tensors, *scalars, *self.tail_const)
                return
        self._jit(tensors, tuple(scalars), (g0,) + self.grid[1:], spec)

    def _jit(self, tensors: tuple, scalars: tuple, grid: tuple, spec: int) -> None:
        result = self.kernel[grid](*tensors, *scalars, **self.constexprs, **self.options)
        if not fast_launch_supported() or spec in self.binaries or not tensors[0].is_cuda:
            return
        aligned = 0
        for t in tensors:
            aligned |= t.data_ptr()
        if aligned % _ALIGN or not all(hasattr(result, a) for a in ("packed_metadata", "function", "run")):
            return
        names = self.kernel.arg_names[len(tensors) + len(scalars):]
        self.tail_const = tuple(self.constexprs[n] for n in names)
        result._init_handles()
        self.binaries[spec] = (result, _c_launch(result.run), triton.runtime.driver.active.get_current_stream,
                               tensors[0].device.index)


_LAUNCHER_CALL = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]


def _c_launch(run) -> tuple | None:
    """(the C launch function behind Triton's `CudaLauncher`, the arguments its `__call__` puts
    between the function and the rest), for a launcher without scratch memory whose `__call__` is
    `(gridX, gridY, gridZ, stream, function, *args)` (Triton 3.6; checked on H100): that call only
    adds (cooperative grid, PDL, no global scratch, no profile scratch), so calling the C function
    directly skips a Python frame per launch. None for any other launcher (Triton 3.9's, say: the
    compiled kernel's `run` is called as before)."""
    launch = getattr(run, "launch", None)
    if not callable(launch) or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    try:
        params = list(inspect.signature(type(run).__call__).parameters)
    except (TypeError, ValueError):
        return None
    if params != _LAUNCHER_CALL or not hasattr(run, "launch_cooperative_grid") or not hasattr(run, "launch_pdl"):
        return None
    return launch, (run.launch_cooperative_grid, run.launch_pdl, None, None)
