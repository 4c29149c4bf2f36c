"""A GGUF whose header gives sizes its tensors cannot hold (issue 32 item 8): refused from the
header, before transformers builds anything, in one line naming the file and the field.

Before: `<arch>.block_count: 100000000` went through to transformers' loader, which builds the
config and then the model from it (10**8 layers); a head count or embedding length past the
tensors was found, if at all, by a shape error after de-quantizing every tensor.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from tpcomp_megatron.convert import cli
from tpcomp_megatron.convert.gguf_header import GGUFHeaderError
from tpcomp_megatron.convert.gguf_source import check_gguf_sizes

from qwen_helpers import make_hf_model, write_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    """A valid tiny Qwen3 GGUF: hidden 48, 6 heads of 12 (q: 72 columns), 3 KV heads, 2 blocks."""
    path = write_gguf(make_hf_model("qwen3"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes()


def _set_u32(data: bytes, key: str, value: int) -> bytes:
    """`data` with the uint32 metadata `key` set to `value` (type 4 = uint32)."""
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 4, key
    return data[:at + 4] + struct.pack("<I", value) + data[at + 8:]


def _set_dims(data: bytes, tensor: str, dims: tuple[int, ...]) -> bytes:
    """`data` with the tensor info of `tensor` given other dimensions (same count)."""
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n = struct.unpack_from("<I", data, at)[0]
    assert n == len(dims), tensor
    return data[:at + 4] + struct.pack(f"<{n}Q", *dims) + data[at + 4 + 8 * n:]


def test_the_tiny_gguf_passes(gguf_bytes, tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes)
    check_gguf_sizes(path, "qwen3")


@pytest.mark.parametrize("field, value", [
    ("block_count", 100_000_000),  # the case
    ("block_count", 3),  # one block more than the tensors hold
    ("embedding_length", 2**20),
    ("embedding_length", 47),  # token_embd.weight is 48 wide: must equal
    ("attention.head_count", 1_000_000),
    ("attention.head_count", 12),  # 12 fits 72 columns alone, 12 heads of 12 do not
    ("attention.head_count_kv", 100_000),
    ("attention.key_length", 2**31 - 2),
    ("feed_forward_length", 10**9),
    ("vocab_size", 2**30),
    ("context_length", 2**32 - 1),  # past any size a config takes
    ("block_count", 0),
])
def test_a_size_the_tensors_cannot_hold_is_refused_at_once(gguf_bytes, tmp_path, capsys, field, value):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(_set_u32(gguf_bytes, f"qwen3.{field}", value))
    t0 = time.perf_counter()
    rc = cli.main([str(path), str(tmp_path / "out"), "--tp", "2", "--formats", "legacy", "--no-progress"])
    took = time.perf_counter() - t0
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert str(path) in lines[0] and f"'qwen3.{field}' is {value}" in lines[0], lines[0]
    assert took < 5, f"refused after {took:.1f} s"  # the header alone: milliseconds, not a model build
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dims", [(48, 2**40), (2**32, 2**32)])
def test_tensor_dimensions_past_the_file_are_refused(gguf_bytes, tmp_path, dims):
    path = tmp_path / "big.gguf"
    path.write_bytes(_set_dims(gguf_bytes, "token_embd.weight", dims))
    with pytest.raises(GGUFHeaderError, match=r"tensor 'token_embd.weight' of dimensions .* does not fit") as e:
        check_gguf_sizes(path, "qwen3")
    assert str(path) in str(e.value)


def test_a_tensor_count_past_the_file_is_refused(gguf_bytes, tmp_path):
    path = tmp_path / "count.gguf"
    path.write_bytes(gguf_bytes[:8] + struct.pack("<Q", 2**60) + gguf_bytes[16:])
    with pytest.raises(GGUFHeaderError, match="lists 1152921504606846976 tensors"):
        check_gguf_sizes(path, "qwen3")


def test_fuzzed_headers_pass_or_are_refused_naming_the_file(gguf_bytes, tmp_path):
    """300 seeded mutations of the header (metadata and tensor list): each passes the size check or
    raises one GGUFHeaderError naming the file, within a second."""
    import random

    rng = random.Random(8)
    refused = 0
    extremes = [0, 1, 3, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]
    end = gguf_bytes.index(b"output_norm.weight") + 64  # the tensor list ends near here
    for i in range(300):
        data = bytearray(gguf_bytes)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(24, end)
            if rng.random() < 0.5:
                data[at] ^= 1 << rng.randrange(8)
            else:
                data[at:at + 4] = struct.pack("<I", rng.choice(extremes) & 0xFFFFFFFF)
        path = tmp_path / f"{i % 4}.gguf"
        path.write_bytes(bytes(data))
        t0 = time.perf_counter()
        try:
            check_gguf_sizes(path, "qwen3")
        except GGUFHeaderError as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
            refused += 1
        assert time.perf_counter() - t0 < 1.0, f"mutation {i}"
    assert refused > 100
