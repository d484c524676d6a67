"""Debate records: Parquet shards that are complete or absent, checked on resume, atomic writes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mft_ray.errors import RecordsError
from mft_ray.run import records
from mft_ray.run.files import write_json_atomic
from mft_ray.run.records import (
    SCHEMA,
    debate_settings,
    read_records,
    rows_to_table,
    shard_is_complete,
    shard_path,
    write_shard,
    write_table_atomic,
)


def make_rows(problem_ids: list[str], agents: int = 2) -> list[dict]:
    rows = []
    for pid in problem_ids:
        for n in range(agents):
            rows.append({
                "iteration": 0,
                "split": "eval",
                "problem_id": pid,
                "agent": n,
                "role": "generator",
                "round": 1,
                "messages": [{"role": "user", "content": f"What is {pid}?"}],
                "response": f"agent {n} says \\boxed{{{n}}}",
                "answer": str(n) if n % 2 == 0 else None,
                "answer_rule": "boxed" if n % 2 == 0 else None,
                "majority": "0",
                "tie": n == 1,
                "consensus": 0.5,
                "others_order": None,
            })
        rows.append({
            "iteration": 0,
            "split": "eval",
            "problem_id": pid,
            "agent": 0,
            "role": "critic",
            "round": 2,
            "messages": [
                {"role": "user", "content": f"What is {pid}?"},
                {"role": "assistant", "content": "agent 0 says \\boxed{0}"},
                {"role": "user", "content": "Here is a summary..."},
            ],
            "response": "still \\boxed{0}",
            "answer": "0",
            "answer_rule": "boxed",
            "majority": None,
            "tie": False,
            "consensus": 0.0,
            "others_order": [2, 1],
        })
    return rows


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------
# Shards


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    ids0, ids1 = ["p0", "p1"], ["p2"]
    rows0, rows1 = make_rows(ids0), make_rows(ids1)
    path = write_shard(tmp_path, 0, rows0, ids0)
    write_shard(tmp_path, 1, rows1, ids1)
    assert path == shard_path(tmp_path, 0) == tmp_path / "shard_00000.parquet"
    assert files_in(tmp_path) == ["shard_00000.parquet", "shard_00001.parquet"]  # no temp files
    assert shard_is_complete(tmp_path, 0, ids0)
    assert shard_is_complete(tmp_path, 1, ids1)

    table = read_records(tmp_path)
    assert table.schema.remove_metadata() == SCHEMA
    assert table.to_pylist() == rows0 + rows1  # shard order, nested messages and nulls preserved
    assert table.column("answer").null_count == 3
    assert table.column("majority").null_count == 3
    assert table.schema.field("messages").type == pa.list_(pa.struct([("role", pa.string()),
                                                                       ("content", pa.string())]))


def test_records_written_before_a_column_existed_read_with_it_null(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = make_rows(["p0"])
    old = pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["others_order"])
    pq.write_table(old, tmp_path / "shard_00000.parquet")
    table = read_records(tmp_path)
    assert table.schema == SCHEMA and table.column("others_order").null_count == len(rows)
    assert table.drop_columns(["others_order"]).to_pylist() == old.to_pylist()


def test_shard_metadata_names_problems_and_rows(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    write_shard(tmp_path, 3, make_rows(ids, agents=1), ids)
    meta = json.loads(pq.read_schema(shard_path(tmp_path, 3)).metadata[b"mft"])
    assert meta == {"problem_ids": ids, "rows": 6}


def test_read_records_orders_shards_by_index(tmp_path: Path) -> None:
    for index in (10, 2, 0):
        write_shard(tmp_path, index, make_rows([f"p{index}"], agents=1), [f"p{index}"])
    order = list(dict.fromkeys(read_records(tmp_path).column("problem_id").to_pylist()))
    assert order == ["p0", "p2", "p10"]


def test_read_records_ignores_other_files_and_refuses_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match="no debate records"):
        read_records(tmp_path)
    (tmp_path / ".shard_00000.parquet.abc.tmp").write_bytes(b"half")
    with pytest.raises(RecordsError):
        read_records(tmp_path)


def test_missing_shard_is_not_complete(tmp_path: Path) -> None:
    assert not shard_is_complete(tmp_path, 0, ["p0"])
    assert not shard_is_complete(tmp_path / "does-not-exist", 0, ["p0"])


def test_empty_shard_round_trip(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, [], [])
    assert shard_is_complete(tmp_path, 0, [])
    assert read_records(tmp_path).num_rows == 0


@pytest.mark.parametrize("keep", [0.5, 0.9, 8 / 9999])
def test_truncated_shard_is_deleted_and_redone(tmp_path: Path, keep: float,
                                               caplog: pytest.LogCaptureFixture) -> None:
    ids = ["p0", "p1"]
    path = write_shard(tmp_path, 0, make_rows(ids), ids)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with caplog.at_level(logging.WARNING, logger="mft_ray.run.records"):
        assert shard_is_complete(tmp_path, 0, ids) is False
    assert not path.exists()
    assert "unreadable" in caplog.text and str(path) in caplog.text
    # Redone, it is trusted again.
    write_shard(tmp_path, 0, make_rows(ids), ids)
    assert shard_is_complete(tmp_path, 0, ids)


def test_shard_without_our_metadata_is_redone(tmp_path: Path) -> None:
    path = shard_path(tmp_path, 0)
    pq.write_table(rows_to_table(make_rows(["p0"])), path)  # valid Parquet, but no "mft" metadata
    assert shard_is_complete(tmp_path, 0, ["p0"]) is False
    assert not path.exists()


def test_shard_of_a_debate_with_other_settings_is_refused(tmp_path: Path) -> None:
    three_by_two = debate_settings(3, 2, True, True)
    write_shard(tmp_path, 0, make_rows(["p0"]), ["p0"], three_by_two)
    assert shard_is_complete(tmp_path, 0, ["p0"], three_by_two)
    # E.g. majority_ft, now scored by one round of samples, resuming a run whose evaluation was a debate.
    with pytest.raises(RecordsError, match=r"a debate with other settings .*'rounds': 2.* use a new run_dir"):
        shard_is_complete(tmp_path, 0, ["p0"], debate_settings(3, 1, False, True))
    # A shard from before the settings were recorded: it may hold the unshuffled debate.
    write_shard(tmp_path, 1, make_rows(["p1"]), ["p1"])
    with pytest.raises(RecordsError, match="from an older version"):
        shard_is_complete(tmp_path, 1, ["p1"], three_by_two)
    assert shard_path(tmp_path, 1).exists()


def test_shard_for_other_problems_is_refused(tmp_path: Path) -> None:
    write_shard(tmp_path, 4, make_rows(["p0", "p1"]), ["p0", "p1"])
    with pytest.raises(RecordsError, match=r"shard_00004\.parquet holds records for other problems"):
        shard_is_complete(tmp_path, 4, ["p0", "p9"])
    with pytest.raises(RecordsError):
        shard_is_complete(tmp_path, 4, ["p1", "p0"])  # same set, different order: a different split
    assert shard_path(tmp_path, 4).exists()  # refused, not deleted: it may be someone's good data


def test_row_count_mismatch_is_redone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = ["p0", "p1"]
    rows = make_rows(ids)
    path = shard_path(tmp_path, 0)
    write_table_atomic(rows_to_table(rows[:-1]), path, {"problem_ids": ids, "rows": len(rows)})
    with caplog.at_level(logging.WARNING, logger="mft_ray.run.records"):
        assert shard_is_complete(tmp_path, 0, ids) is False
    assert not path.exists()
    assert f"expected {len(rows)}" in caplog.text


def test_rows_to_table_rejects_rows_that_do_not_fit_the_schema() -> None:
    bad = make_rows(["p0"])
    bad[0]["round"] = "one"
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        rows_to_table(bad)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _half_then_raise(real_write):
    def write_table(table, where, *args, **kwargs):
        sink = pa.BufferOutputStream()
        real_write(table, sink, *args, **kwargs)
        data = sink.getvalue().to_pybytes()
        Path(where).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    return write_table


def test_write_table_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.parquet"
    write_table_atomic(rows_to_table(make_rows(["p0"])), path, {"k": 1})
    write_table_atomic(rows_to_table(make_rows(["p1", "p2"])), path, {"k": 2})
    assert files_in(path.parent) == ["t.parquet"]
    table = pq.read_table(path)
    assert set(table.column("problem_id").to_pylist()) == {"p1", "p2"}
    assert json.loads(table.schema.metadata[b"mft"]) == {"k": 2}


def test_failed_table_write_leaves_nothing_at_the_final_path(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.parquet"
    monkeypatch.setattr(pq, "write_table", _half_then_raise(pq.write_table))
    with pytest.raises(OSError, match="disk full"):
        write_table_atomic(rows_to_table(make_rows(["p0"])), path)
    assert files_in(tmp_path) == []


def test_failed_table_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = ["p0"]
    write_shard(tmp_path, 0, make_rows(ids), ids)
    before = shard_path(tmp_path, 0).read_bytes()
    monkeypatch.setattr(pq, "write_table", _half_then_raise(pq.write_table))
    with pytest.raises(OSError):
        write_shard(tmp_path, 0, make_rows(["p0", "p1"]), ["p0", "p1"])
    assert files_in(tmp_path) == ["shard_00000.parquet"]
    assert shard_path(tmp_path, 0).read_bytes() == before
    assert shard_is_complete(tmp_path, 0, ids)


def test_failed_rename_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(records.os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device"):
        write_table_atomic(rows_to_table(make_rows(["p0"])), tmp_path / "t.parquet")
    with pytest.raises(OSError, match="cross-device"):
        write_json_atomic({"a": 1}, tmp_path / "m.json")
    assert files_in(tmp_path) == []


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "metrics.json"
    write_json_atomic({"b": 1, "a": [1.5, None]}, path)
    write_json_atomic({"accuracy": 0.75}, path)
    assert json.loads(path.read_text()) == {"accuracy": 0.75}
    assert path.read_text().endswith("\n")
    assert files_in(path.parent) == ["metrics.json"]


def test_failed_json_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic({"accuracy": 0.5}, path)

    real_write_text = Path.write_text

    def half_then_raise(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_raise)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic({"accuracy": 0.75, "stderr": 0.1}, path)
    monkeypatch.undo()
    assert files_in(tmp_path) == ["metrics.json"]
    assert json.loads(path.read_text()) == {"accuracy": 0.5}


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, path)
    assert files_in(tmp_path) == []


def test_final_path_is_never_a_partial_file_even_for_readers(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While the table is being written, the final path does not exist yet (only the temp name does)."""
    path = tmp_path / "t.parquet"
    seen = {}
    real_write = pq.write_table

    def spying_write(table, where, *args, **kwargs):
        seen["final_exists_during_write"] = path.exists()
        seen["where"] = Path(where)
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", spying_write)
    write_table_atomic(rows_to_table(make_rows(["p0"])), path)
    assert seen["final_exists_during_write"] is False
    assert seen["where"] != path and seen["where"].parent == path.parent
    assert not seen["where"].exists() and path.exists()
    assert os.path.getsize(path) > 0


# ---------------------------------------------------------------------------------------------
# Checked readers: markers and sealed sets


def test_read_json_checked_trusts_only_whole_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mft_ray.run.files import read_json_checked

    path = tmp_path / "society.json"
    assert read_json_checked(path) is None  # missing: the stage has not run
    write_json_atomic({"generator_0": "/x"}, path)
    assert read_json_checked(path) == {"generator_0": "/x"}
    path.write_text(path.read_text()[:-6])
    with caplog.at_level(logging.WARNING, logger="mft_ray.run.records"):
        assert read_json_checked(path) is None
    assert "not valid JSON" in caplog.text and not path.exists()
    path.write_bytes(b"\xff\xfe{")
    assert read_json_checked(path) is None and not path.exists()


def test_sealed_marker_round_trip_and_every_kind_of_damage(tmp_path: Path) -> None:
    from mft_ray.run.files import SEAL_KEY, file_digest, read_sealed_json, write_jsonl_atomic, write_sealed_json

    a, b = tmp_path / "a.jsonl", tmp_path / "sub" / "b.jsonl"
    write_jsonl_atomic([{"x": 1}, {"x": 2}], a)
    write_jsonl_atomic([], b)  # an empty set is sealed too
    marker = tmp_path / "counts.json"
    write_sealed_json({"n": 2}, marker, [a, b])
    assert json.loads(marker.read_text())[SEAL_KEY] == {"a.jsonl": file_digest(a), "sub/b.jsonl": file_digest(b)}
    assert read_sealed_json(marker) == {"n": 2}

    def damaged(change) -> bool:
        write_jsonl_atomic([{"x": 1}, {"x": 2}], a)
        write_jsonl_atomic([], b)
        write_sealed_json({"n": 2}, marker, [a, b])
        change()
        return read_sealed_json(marker) is None and not marker.exists()

    assert damaged(lambda: a.write_text('{"x": 1}\n'))  # cut at a line: still valid JSONL
    assert damaged(lambda: a.write_text(a.read_text().replace("1", "7")))  # same size, other bytes
    assert damaged(lambda: b.unlink())
    assert damaged(lambda: marker.write_text(marker.read_text()[:20]))
    assert damaged(lambda: write_json_atomic({"n": 2}, marker))  # no seal: an older version's marker
    assert read_sealed_json(tmp_path / "never-written.json") is None


def test_atomic_writers_flush_to_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename that reaches the disk before the data would leave a complete-looking empty file after a
    power loss: each writer fsyncs its temporary file first."""
    from mft_ray.run.files import write_text_atomic

    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(records.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(records.os, "replace", lambda s, d: (order.append("replace"), real_replace(s, d))[1])
    write_text_atomic("x", tmp_path / "t.txt")
    write_table_atomic(rows_to_table(make_rows(["p0"])), tmp_path / "t.parquet")
    assert order == ["fsync", "replace", "fsync", "replace"]


def test_read_only_callers_leave_a_broken_marker_in_place(tmp_path):
    """``repair=False`` (mft status / serve, evaluating another run's society) reports a broken file as
    absent without deleting it; the default (the job that redoes the stage) removes it."""
    from mft_ray.run.files import read_json_checked
    from mft_ray.run.rundir import RunDir

    run = RunDir(tmp_path)
    run.iteration_dir(1).mkdir(parents=True)
    run.society_path(1).write_text('{"generator_0": "/x", "crit')
    assert run.read_society(1, repair=False) is None and run.society_path(1).exists()
    run.society_path(1).write_text("[1, 2]")
    assert run.read_society(1, repair=False) is None and run.society_path(1).exists()
    assert read_json_checked(run.society_path(1), repair=False) == [1, 2]
    assert run.read_society(1) is None and not run.society_path(1).exists()
