"""tpcomp-tune on real gloo ranks, and the gate following the table it writes.

Compression does not pay on gloo over CPU threads, so the tests make it pay: the exact all-reduce
is slowed by a sleep (EXACT_DELAY_S) on every rank. The sleeps are far above gloo's own times
(~1-5 ms here) so that the decisions the tests expect do not depend on this machine's load.
"""

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.codecs.base import Codec
from tpcomp_megatron.codecs.block import BlockCodec
from tpcomp_megatron.comm import CompressedComm, GatePolicy, check_same_config
from tpcomp_megatron.comm.gate import ineligible
from tpcomp_megatron.comm.gate.table import (EXACT, WHY_FASTER, WHY_SMALL, GateTable, SizeRow, TableKey, find_in_cache,
                                        path_name, store_in_cache)
from tpcomp_megatron.testing import run_ranks
from tpcomp_megatron.tune import TuneConfig, tune
from tpcomp_megatron.tune.report import format_table

FAST, SLOW = "fp4_e2m1/b32/e8m0", "int4/b32/bf16"
EXACT_DELAY_S = 0.08
SLOW_ENCODE_S = 0.2  # the injected slow path: far slower than the slowed exact all-reduce
HIDDEN = 64


def _slowed(fn, seconds, when=lambda *a, **k: True):
    def slow(*args, **kwargs):
        if when(*args, **kwargs):
            time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


class _Patched:
    """Set attributes for the duration of a `with`, then restore them (per rank process)."""

    def __init__(self, *patches):
        self.patches = patches  # (owner, name, replacement)

    def __enter__(self):
        self.saved = [(o, n, getattr(o, n)) for o, n, _ in self.patches]
        for owner, name, new in self.patches:
            setattr(owner, name, new)

    def __exit__(self, *exc):
        for owner, name, old in reversed(self.saved):
            setattr(owner, name, old)


def _x(tokens, rank):
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)


def _tune_cli_and_follow(rank, world, tmp):
    from tpcomp_megatron.tune.cli import main

    slow_exact = _slowed(dist.all_reduce, EXACT_DELAY_S)
    slow_encode = _slowed(BlockCodec.encode, SLOW_ENCODE_S, lambda self, *a, **k: str(self.spec) == SLOW)
    out = f"{tmp}/table.json"
    with _Patched((dist, "all_reduce", slow_exact), (BlockCodec, "encode", slow_encode)):
        t0 = time.monotonic()
        main(["--hidden", str(HIDDEN), "--tokens", "4", "16", "--codecs", FAST, SLOW, "--warmup", "1",
              "--iters", "2", "--repeats", "1", "--out", out, "--cache-dir", f"{tmp}/cache"])
        elapsed = time.monotonic() - t0
    dist.barrier()  # rank 0 has written the file
    table = GateTable.load(out)
    cached, _ = find_in_cache(table.key, root=Path(tmp) / "cache")
    comm = CompressedComm(policy=GatePolicy(link="cpu", table=table))
    for tokens in (4, 16, 8, 2, 64):  # measured, between, below the smallest, above the largest
        for spec in (FAST, SLOW):
            before = comm.stats.calls_fallback
            got = comm.all_reduce(_x(tokens, rank), make_codec(spec))
            if comm.stats.calls_fallback > before:
                want = _x(tokens, rank)
                dist.all_reduce(want)
                assert torch.equal(got, want), "an exact call must equal dist.all_reduce"
    return (table.to_dict(), cached is not None and cached.digest == table.digest, elapsed,
            comm.stats.by_bucket(), comm.stats.summary())


@pytest.mark.parametrize("world", [2, 4])
def test_tune_writes_a_table_the_gate_follows_and_never_picks_the_slow_path(world, tmp_path):
    results = run_ranks(_tune_cli_and_follow, world, str(tmp_path), timeout_s=120)
    doc, cached, elapsed, buckets, summary = results[0]
    assert all(r[0] == doc for r in results), "ranks derived different tables"
    assert all(r[1] for r in results), "the table is not in the cache under its key"
    assert elapsed < 30, f"tpcomp-tune took {elapsed:.1f} s for two sizes"
    assert doc["key"]["world_size"] == world and doc["key"]["device"] == "cpu"
    rows = {r["tokens"]: r for r in doc["rows"]}
    assert sorted(rows) == [4, 16]
    for r in rows.values():
        assert r["bytes"] == r["tokens"] * HIDDEN * 2 and EXACT in r["ms"]
        for algo in ("one_shot", "two_shot"):
            assert r["winner"][path_name(SLOW, algo, "nccl")] == "exact", (r["ms"], "slow path chosen")
        # the premise (compression can win here) holds, so the line above can fail
        assert r["winner"][path_name(FAST, "one_shot", "nccl")] == "compressed", r["ms"]
    # the gate: FAST compressed at and between the measured sizes and above them (one-shot at 2
    # ranks, two-shot at 4: whichever the table measured faster), exact below them; SLOW never.
    algo = "one_shot" if world <= 3 else "two_shot"
    fast_wins = all(r["winner"][path_name(FAST, algo, "nccl")] == "compressed" for r in rows.values())
    for r in results:
        b = r[3]
        exact_reasons = {reason for bucket in b.values() for reason in bucket["exact"]}
        assert WHY_SMALL in exact_reasons
        compressed = sum(bucket["compressed"] for bucket in b.values())
        assert compressed == (4 if fast_wins else 0), (b, doc["rows"])
    assert WHY_SMALL in summary and "compressed" in summary


def _rank_dependent(rank, world):
    """The exact path slowed on every rank; FAST's decode slowed on rank 1 only: alone, rank 0
    would find FAST faster and rank 1 slower."""
    slow_exact = _slowed(dist.all_reduce, 0.08)
    slow_decode = _slowed(Codec.decode_sum, 0.12, lambda self, *a, **k: rank == 1 and str(self.spec) == FAST)
    cfg = TuneConfig(hidden=HIDDEN, tokens=(4, 16), codecs=(FAST,), algorithms=("one_shot",), warmup=1, iters=2,
                     repeats=3)
    with _Patched((dist, "all_reduce", slow_exact), (Codec, "decode_sum", slow_decode)):
        result = tune(cfg)
    path = path_name(FAST, "one_shot", "nccl")
    local = {t: result.local_ms[(t, path, "eager")] * (1 + cfg.margin) <= result.local_ms[(t, EXACT, "eager")]
             for t in cfg.tokens}
    return result.table.to_dict(), local


def test_rank_dependent_timings_give_the_same_decision_on_every_rank():
    (doc0, local0), (doc1, local1) = run_ranks(_rank_dependent, 2, timeout_s=120)
    assert doc0 == doc1
    assert any(local0.values()) and not any(local1.values()), ("premise: alone the ranks would disagree", local0, local1)
    for r in doc0["rows"]:  # the slowest rank decides
        assert r["winner"][path_name(FAST, "one_shot", "nccl")] == "exact", r["ms"]


def _key(**kw):
    base = dict(device="cpu", world_size=2, link="cpu", torch=torch.__version__, nccl="none")
    return TableKey(**{**base, **kw})


def _table(key=None, exact=1.0, fast=0.5):
    rows = tuple(SizeRow(tokens=t, hidden=HIDDEN, ms={EXACT: {"eager": exact},
                                                      path_name(FAST, "one_shot", "nccl"): {"eager": fast}})
                 for t in (4, 16))
    return GateTable(key=key or _key(), rows=rows)


def _refused(rank, world, table_doc):
    table = GateTable.from_dict(table_doc, "t.json")
    t0 = time.monotonic()
    try:
        CompressedComm(policy=GatePolicy(link="cpu", table=table))
    except ValueError as e:
        return str(e), time.monotonic() - t0
    return None, 0.0


@pytest.mark.parametrize("field,value", [("world_size", 4), ("device", "NVIDIA H100 80GB HBM3"),
                                         ("torch", "2.0.0"), ("link", "nvlink"), ("format", 1)])
def test_a_table_with_another_key_is_refused_naming_the_field(field, value):
    table = _table(_key(**{field: value}))
    for msg, elapsed in run_ranks(_refused, 2, table.to_dict(), timeout_s=120):
        assert msg and f"{field}: table {value!r}" in msg and "tpcomp-tune" in msg, msg
        assert elapsed < 10
    assert table.refusal(_key()) and _table().refusal(_key()) is None


def test_the_cache_is_invalidated_when_a_key_field_changes(tmp_path):
    key = _key()
    where = store_in_cache(_table(key), tmp_path)
    other_slot = store_in_cache(_table(_key(world_size=4)), tmp_path)
    found, note = find_in_cache(key, tmp_path)
    assert found is not None and found == _table(key) and str(where) in note
    newer = dataclasses.replace(key, torch="99.0")
    found, note = find_in_cache(newer, tmp_path)
    assert found is None and "invalidated" in note and "torch: table" in note
    assert not where.exists() and other_slot.exists()  # the other world size's table stays
    assert find_in_cache(key, tmp_path)[0] is None  # gone, not merely skipped


def test_the_table_is_part_of_the_cross_rank_digest_and_the_gate_is_pure():
    a, b = _table(), _table(fast=0.98)  # b: faster, but not by the 5% margin
    assert a.digest != b.digest and a.digest == _table().digest
    assert f"table={a.digest}" in GatePolicy(link="cpu", table=a).describe()
    assert "table=none" in GatePolicy(link="cpu").describe()
    x = torch.zeros(8, HIDDEN, dtype=torch.bfloat16)  # 8 tokens: between the measured 4 and 16
    fast = make_codec(FAST)
    policy = GatePolicy(link="cpu", table=a)
    assert ineligible(x, fast, 2, policy) is None
    assert ineligible(x, fast, 2, policy, extra_cost=2.0) == WHY_FASTER  # error feedback's extra work
    assert ineligible(x[:2], fast, 2, policy) == WHY_SMALL
    assert ineligible(x, fast, 2, GatePolicy(link="cpu", table=b)) == WHY_FASTER
    # paths the table did not measure (another algorithm or codec), and the sequence-parallel
    # collectives, keep the thresholds; an explicit size override wins over the table
    seed = ineligible(x, fast, 2, GatePolicy(link="cpu"))
    assert seed == "below size threshold"
    assert ineligible(x, fast, 2, policy, algorithm="two_shot") == seed
    assert ineligible(x, make_codec(SLOW), 2, policy) == seed
    assert ineligible(x, fast, 2, policy, op="reduce_scatter") == seed
    assert ineligible(x[:2], fast, 2, GatePolicy(link="cpu", table=a, min_bytes=0)) is None


def _digest_mismatch(rank, world, table_doc):
    policy = GatePolicy(link="cpu", table=GateTable.from_dict(table_doc) if rank == 0 else None)
    try:
        check_same_config(policy.describe())
    except ValueError as e:
        return str(e)
    return None


def test_ranks_with_and_without_a_table_fail_the_configuration_check():
    for msg in run_ranks(_digest_mismatch, 2, _table().to_dict(), timeout_s=120):
        assert msg and "different compression configurations" in msg and "table=none" in msg


def test_bad_tables_and_configs_fail_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "key": {"device": "cpu"}, "rows": []}))
    with pytest.raises(ValueError, match="not a tpcomp-tune table"):
        GateTable.load(bad)
    with pytest.raises(FileNotFoundError, match="tpcomp-tune --out"):
        GateTable.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="cannot compress hidden size 48"):
        TuneConfig(hidden=48, codecs=(FAST,))
    with pytest.raises(ValueError, match="needs a calibration"):
        TuneConfig(hidden=64, codecs=("outlier_int4/k32",))
    with pytest.raises(ValueError, match="tokens must be positive"):
        TuneConfig(hidden=64, tokens=(0, 4))
    with pytest.raises(ValueError, match="must be a GateTable"):
        GatePolicy(link="cpu", table={"rows": []})
    text = format_table(_table())
    assert "compress" in text and "world size 2" in text


def _apply_with_tables(rank, world, tmp):
    """apply_tp_compression: the cached table of this key is found and used (said once); a table
    of another key, and ranks given different tables, fail on every rank within seconds."""
    import logging

    from megatron_helpers import init_megatron, one_row_parallel_layer

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("tpcomp_megatron").addHandler(handler)
    _ctx = init_megatron(world)  # noqa: F841
    model = one_row_parallel_layer(world, HIDDEN)
    out = {}
    handle = apply_tp_compression(model, CompressionConfig(spec=FAST, link="cpu"))
    out["cached"] = handle.comm.policy.table.digest
    handle.remove()
    handle = apply_tp_compression(model, CompressionConfig(spec=FAST, link="cpu", gate_table="seed"))
    out["seed"] = handle.comm.policy.table
    handle.remove()
    for name, choice in (("other key", f"{tmp}/old.json"), ("one rank seed", f"{tmp}/old.json" if rank else "seed"),
                         ("missing", f"{tmp}/missing.json")):
        t0 = time.monotonic()
        try:
            apply_tp_compression(model, CompressionConfig(spec=FAST, link="cpu", gate_table=choice))
            out[name] = (None, 0.0)
        except ValueError as e:
            out[name] = (str(e), time.monotonic() - t0)
    out["log"] = [m for m in seen if "gate:" in m]
    return out


def test_apply_uses_the_cached_table_and_refuses_mismatches_on_every_rank(tmp_path):
    cache = tmp_path / "xdg" / "tpcomp-megatron" / "gate"
    table = _table()
    store_in_cache(table, cache)
    _table(_key(torch="1.0")).save(tmp_path / "old.json")
    results = run_ranks(_apply_with_tables, 2, str(tmp_path), env={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
                        timeout_s=120, pg_timeout_s=30)
    for out in results:
        assert out["cached"] == table.digest and out["seed"] is None
        assert len(out["log"]) == 2 and "cached measured table" in out["log"][0] and "seed" in out["log"][1]
        msg, elapsed = out["other key"]
        assert msg and "torch: table '1.0'" in msg and elapsed < 10
        msg, elapsed = out["one rank seed"]
        assert msg and "different compression configurations" in msg and elapsed < 10
        msg, elapsed = out["missing"]
        assert msg and "missing.json not found" in msg and elapsed < 10


def test_model_shape_reads_a_converted_checkpoint(tmp_path):
    from tpcomp_megatron.models.core.config import LlamaModelConfig

    LlamaModelConfig(num_layers=3, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_kv_heads=4,
                     head_dim=64, vocab_size=512, max_position_embeddings=64, tensor_parallel_size=2,
                     params_dtype="float32").save(tmp_path / "tpcomp_config.json")
    from tpcomp_megatron.tune.cli import model_shape

    assert model_shape(tmp_path) == (256, 3)
    with pytest.raises(FileNotFoundError, match="tpcomp-convert output"):
        model_shape(tmp_path / "nothing")


def test_stats_count_calls_per_size_bucket_with_reasons():
    from tpcomp_megatron.comm import CommStats

    s = CommStats()
    for _ in range(3):
        s.record_compressed(300, 1 << 20)  # [1 MiB, 2 MiB)
    s.record_fallback(WHY_SMALL, 4096)
    s.record_fallback(WHY_SMALL, 5000)
    s.record_fallback("dtype torch.int32", 3000)
    b = s.by_bucket()
    assert b[21] == {"compressed": 3, "exact": {}}
    assert b[13] == {"compressed": 0, "exact": {WHY_SMALL: 2}}
    assert b[12]["exact"] == {"dtype torch.int32": 1}
    text = s.summary()
    assert "[1 MiB, 2 MiB)" in text and f"{WHY_SMALL} (2)" in text and "3 compressed / 3 exact" in text
    s.reset()
    assert s.by_bucket() == {} and s.compressed_at == {}


def test_tune_on_a_one_process_stand_in_group_writes_a_table_no_real_run_takes(tmp_path):
    """`--pg mirror`: one process standing in for rank 0 of 4 (one rank's host and kernel time);
    its table's link is the stand-in's name, so a real run refuses it."""
    from tpcomp_megatron.tune.cli import main

    assert not dist.is_initialized()
    main(["--hidden", str(HIDDEN), "--tokens", "4", "--codecs", FAST, "--warmup", "0", "--iters", "1",
          "--repeats", "1", "--pg", "mirror", "--world-size", "4", "--out", str(tmp_path / "t.json"), "--no-cache"])
    assert not dist.is_initialized()
    table = GateTable.load(tmp_path / "t.json")
    assert table.key.link == "mirror" and table.key.world_size == 4
    assert "link: table 'mirror', this run 'cpu'" in table.refusal(_key(world_size=4))


def _probe_at_apply(rank, world, tmp):
    """apply_tp_compression with no table: `gate_probe=True` times the group and the gate follows
    the probed table (the same on every rank, though one rank's exact all-reduce is slowed far
    more than the other's); a codec slowed on every rank is not chosen; the default probes no
    gloo group; `min_bytes` needs no probe."""
    from megatron_helpers import init_megatron, one_row_parallel_layer

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.comm.gate import probe

    _ctx = init_megatron(world)  # noqa: F841
    model = one_row_parallel_layer(world, HIDDEN)
    out = {}
    slow_exact = _slowed(dist.all_reduce, EXACT_DELAY_S * (1 + rank))
    slow_encode = _slowed(BlockCodec.encode, SLOW_ENCODE_S, lambda codec, *a, **k: codec.spec.element == "int4")
    with _Patched((dist, "all_reduce", slow_exact), (BlockCodec, "encode", slow_encode),
                  (probe, "PROBE_TOKENS", (2, 16)), (probe, "PROBE_ITERS", 2), (probe, "PROBE_REPEATS", 1)):
        for spec in (FAST, SLOW):
            cfg = CompressionConfig(spec=spec, link="cpu", gate_probe=True)
            handle = apply_tp_compression(model, cfg)
            table = handle.comm.policy.table
            x = _x(16, rank)
            out[spec] = (table.digest, table.meta.get("source"),
                         table.why_exact(path_name(spec, "one_shot", "nccl"), x.numel() * 2),
                         handle.comm._why("one_shot", x, make_codec(spec), 1.0)[0])
            handle.remove()
    handle = apply_tp_compression(model, CompressionConfig(spec=FAST, link="cpu"))
    out["default"] = handle.comm.policy.table
    handle.remove()
    handle = apply_tp_compression(model, CompressionConfig(spec=FAST, link="cpu", gate_probe=True, min_bytes=0))
    out["min_bytes"] = handle.comm.policy.table
    handle.remove()
    return out


def test_apply_probes_the_group_when_no_table_serves(tmp_path):
    results = run_ranks(_probe_at_apply, 2, str(tmp_path), env={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
                        timeout_s=240, pg_timeout_s=60)
    assert results[0][FAST][0] == results[1][FAST][0] and results[0][SLOW][0] == results[1][SLOW][0]
    for out in results:
        digest, source, why, gate = out[FAST]
        assert source == "probe at apply_tp_compression" and why is None and gate is None, out[FAST]
        digest, source, why, gate = out[SLOW]
        assert why is not None and gate is not None, out[SLOW]  # the slowed codec: exact
        assert out["default"] is None and out["min_bytes"] is None
