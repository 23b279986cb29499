"""Dataset loading: formats, field mapping, category filter, built-ins, fingerprints and errors."""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tiny import shared_data
from harmprune.core.data import DataSpec, Record, data_fingerprint, load, load_records
from harmprune.core.errors import DataError, HarmpruneError
from harmprune.core.settings import add_arguments, from_namespace

ROWS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast.", "category": "food"},
    {"prompt": "Name a prime.", "response": "Seven.", "category": "math"},
    {"prompt": "What is 2+2?", "response": "Four.", "category": "math"},
]
EXPECTED = [Record(r["prompt"], r["response"], r["category"], f"rows:{i}") for i, r in enumerate(ROWS, 1)]


def _bytes(fmt: str, rows: list[dict]) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "json":
        return json.dumps(rows).encode()
    if fmt == "json-dict":
        return json.dumps({"name": "x", "data": rows}).encode()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def write_rows(tmp_path: Path, name: str, rows: list[dict]) -> str:
    suffix = name.removesuffix(".gz").rsplit(".", 1)[1]
    raw = _bytes("csv" if suffix == "csv" else "jsonl" if suffix == "jsonl" else "json", rows)
    return write(tmp_path, name, gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw)


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt,name", [("jsonl", "rows.jsonl"), ("json", "rows.json"), ("json-dict", "rows.json"),
                                      ("csv", "rows.csv")])
@pytest.mark.parametrize("gz", [False, True])
def test_each_format_gives_the_same_records(tmp_path, fmt, name, gz):
    raw = _bytes(fmt, ROWS)
    path = write(tmp_path, name + (".gz" if gz else ""), gzip.compress(raw) if gz else raw)
    assert load(path) == EXPECTED


def test_jsonl_ids_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps({**ROWS[1], "id": 42}) + "\n"
    recs = load(write(tmp_path, "d.jsonl", text))
    assert [r.id for r in recs] == ["d:1", "42"]


def test_utf8_bom_and_non_ascii_text(tmp_path):
    rows = [{"prompt": "Qu'est-ce qu'un café ?", "response": "Une boisson — chaude."}]
    path = write(tmp_path, "fr.csv", b"\xef\xbb\xbf" + _bytes("csv", rows))
    assert load(path)[0].prompt == rows[0]["prompt"]


def test_chat_rows(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}],
         "category": "multi"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "par"}, {"type": "text", "text": "ts"}]},
                      {"role": "assistant", "content": "ok"}]},
    ]
    recs = load(write_rows(tmp_path, "chat.jsonl.gz", rows))
    assert recs == [Record("Hi", "Hello.", None, "chat:1", "Be terse."),
                    Record("second", "two", "multi", "chat:2"),
                    Record("parts", "ok", None, "chat:3")]


def test_chat_rows_without_assistant_need_require_response_false(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]}]
    path = write_rows(tmp_path, "p.jsonl", rows)
    assert load(path, require_response=False) == [Record("Q?", "", None, "p:1", "S")]
    msg = error_of(load, path)
    assert "p.jsonl row 1" in msg and "assistant" in msg and "messages" in msg


def test_chat_row_whose_assistant_follows_no_user_is_an_error(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}]
    msg = error_of(load, write_rows(tmp_path, "c.jsonl", rows))
    assert "c.jsonl row 1" in msg and "user" in msg


# ---------------------------------------------------------------- field mapping


@pytest.mark.parametrize("row,expected", [
    ({"instruction": "I", "output": "O"}, ("I", "O", None)),
    ({"goal": "G", "target": "T"}, ("G", "T", None)),
    ({"question": "Q", "answer": "A", "Category": "c"}, ("Q", "A", "c")),
    ({"Behavior": "B", "completion": "C", "SemanticCategory": "s"}, ("B", "C", "s")),
    # behaviour wins over the adversarial test case; response over completion
    ({"test_case": "adv", "behavior": "B", "completion": "C", "response": "R", "semantic_category": "s"},
     ("B", "R", "s")),
])
def test_auto_detected_fields(tmp_path, row, expected):
    rec = load(write_rows(tmp_path, "a.csv", [row]))[0]
    assert (rec.prompt, rec.response, rec.category) == expected


def test_explicit_fields_win_over_auto_detection(tmp_path):
    rows = [{"prompt": "P", "question": "Q", "response": "R", "alt": "X", "category": "c", "kind": "k"}]
    path = write_rows(tmp_path, "e.jsonl", rows)
    rec = load(path, prompt_field="question", response_field="alt", category_field="kind")[0]
    assert (rec.prompt, rec.response, rec.category) == ("Q", "X", "k")


def test_prompt_only_data(tmp_path):
    path = write_rows(tmp_path, "q.csv", [{"goal": "G1", "category": "x"}, {"goal": "G2", "category": "y"}])
    assert [(r.prompt, r.response, r.category) for r in load(path, require_response=False)] == [
        ("G1", "", "x"), ("G2", "", "y")]
    msg = error_of(load, path)
    assert "q.csv" in msg and "response" in msg and "goal, category" in msg


def test_number_category_becomes_text_number_response_is_refused(tmp_path):
    path = write_rows(tmp_path, "n.jsonl", [{"prompt": "p", "response": "r", "category": 3}])
    assert load(path)[0] == Record("p", "r", "3", "n:1")
    path = write_rows(tmp_path, "m.jsonl", [{"prompt": "p", "response": "r", "category": None}])
    assert load(path)[0] == Record("p", "r", None, "m:1")
    path = write_rows(tmp_path, "k.jsonl", [{"prompt": "p", "response": 7}])
    msg = error_of(load, path)
    assert "k.jsonl row 1" in msg and "'response' is int, not text" in msg


# ---------------------------------------------------------------- category filter


def test_category_filter_single_and_list(tmp_path):
    path = write_rows(tmp_path, "rows.jsonl", ROWS)
    assert load(path, category="math") == EXPECTED[1:]
    assert load(path, category="food, math") == EXPECTED
    assert load(path, category="FOOD") == EXPECTED[:1]


def test_unknown_category_lists_the_available_ones(tmp_path):
    path = write_rows(tmp_path, "rows.jsonl", ROWS)
    msg = error_of(load, path, category="math,sport")
    assert "rows.jsonl" in msg and "'sport'" in msg and "food (1)" in msg and "math (2)" in msg


def test_category_filter_without_categories(tmp_path):
    path = write_rows(tmp_path, "nc.jsonl", [{"prompt": "p", "response": "r"}])
    msg = error_of(load, path, category="x")
    assert "nc.jsonl" in msg and "category" in msg


# ---------------------------------------------------------------- built-ins


def _builtin_file(name: str) -> bytes:
    return resources.files("harmprune.data").joinpath("builtin", name).read_bytes()


@pytest.mark.parametrize("base,ncat", [("harmful", 10), ("benign", 10)])
def test_builtins_split_by_prompt(base, ncat):
    train, test, both = load(base + ":train"), load(base + ":test"), load(base + ":all")
    assert load(base) == train
    assert len(train) + len(test) == len(both) >= 300
    assert {r.id for r in train} | {r.id for r in test} == {r.id for r in both}
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert 0.1 < len(test) / len(both) < 0.3
    cats = {r.category for r in both}
    assert len(cats) == ncat and None not in cats
    assert {r.category for r in train} == {r.category for r in test} == cats
    assert all(r.prompt.strip() and r.response.strip() for r in both)
    assert len({r.id for r in both}) == len(both)


def test_builtin_harmful_has_no_obvious_refusals():
    for r in load("harmful:all"):
        assert len(r.response.split()) >= 20
        assert not r.response.lower().startswith(("i'm sorry", "i cannot", "i can't", "i apologize"))


def test_builtin_notice_and_licences_are_shipped():
    notice = _builtin_file("NOTICE.md").decode()
    for needle in ("Apache-2.0", "MIT", "CC BY 4.0", "9d852fae1a9121c78b29142de733cb1340770cc3",
                   "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"):
        assert needle in notice
    for lic in ("Apache-2.0-refusal_direction.txt", "MIT-JailbreakBench.txt", "CC-BY-4.0-XSTest.txt"):
        assert len(_builtin_file(lic)) > 500
    for name in ("harmful.jsonl", "benign.jsonl"):
        assert hashlib.sha256(_builtin_file(name)).hexdigest() in notice


@pytest.mark.skipif(shared_data() is None, reason="the shared source data folder is not on this machine")
def test_build_script_reproduces_the_shipped_files(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_builtin_data.py"
    subprocess.run([sys.executable, str(script), "--src", str(shared_data()), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    # Other stages ship files in the same folder; this script owns these and NOTICE.md's generated head.
    owned = ["harmful.jsonl", "benign.jsonl", "Apache-2.0-refusal_direction.txt", "MIT-JailbreakBench.txt",
             "CC-BY-4.0-XSTest.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(owned + ["NOTICE.md"])
    for name in owned:
        assert (tmp_path / name).read_bytes() == _builtin_file(name), name
    marker = b"<!-- Generated above this line"
    head = (tmp_path / "NOTICE.md").read_bytes().split(marker)[0]
    assert marker in _builtin_file("NOTICE.md") and _builtin_file("NOTICE.md").split(marker)[0] == head


def test_unknown_builtin_lists_the_names():
    for bad in ("harmfull", "harmful:val"):
        msg = error_of(load, bad)
        assert bad in msg and "harmful:test" in msg and "benign:all" in msg


# ---------------------------------------------------------------- fingerprint and spec


def test_fingerprint_hashes_the_file_bytes(tmp_path):
    path = write_rows(tmp_path, "rows.csv.gz", ROWS)
    spec = DataSpec(data=path, category="math")
    fp = data_fingerprint(spec, load_records(spec))
    assert fp == {"spec": {"data": path, "prompt_field": None, "response_field": None, "category_field": None,
                           "category": "math"},
                  "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "rows": 2,
                  "categories": {"math": 2}}
    fpb = data_fingerprint(DataSpec("benign:test"), load("benign:test"))
    assert fpb["sha256"] == hashlib.sha256(_builtin_file("benign.jsonl")).hexdigest()
    assert sum(fpb["categories"].values()) == fpb["rows"] == len(load("benign:test"))


def test_dataspec_as_cli_options():
    parser = argparse.ArgumentParser()
    add_arguments(parser, DataSpec)
    ns = parser.parse_args(["--data", "harmful:test", "--prompt-field", "q", "--category", "a,b"])
    spec = from_namespace(DataSpec, ns)
    assert spec == DataSpec("harmful:test", "q", None, None, "a,b") and spec.categories() == ["a", "b"]
    for bad in ({"data": " "}, {"data": "x", "category": " , "}, {"data": "x", "prompt_field": ""}):
        with pytest.raises(HarmpruneError):
            DataSpec(**bad)


# ---------------------------------------------------------------- errors


def test_missing_file():
    msg = error_of(load, "/no/such/dir/data.jsonl")
    assert "/no/such/dir/data.jsonl" in msg and "no such file" in msg


def test_missing_explicit_field_lists_the_row_fields(tmp_path):
    path = write_rows(tmp_path, "rows.jsonl", ROWS)
    msg = error_of(load, path, prompt_field="goal")
    assert "rows.jsonl row 1" in msg and "'goal'" in msg and "prompt, response, category" in msg


def test_field_missing_in_a_later_row(tmp_path):
    path = write_rows(tmp_path, "m.jsonl", [ROWS[0], {"prompt": "p", "answer": "a"}])
    msg = error_of(load, path)
    assert "m.jsonl row 2" in msg and "'response'" in msg and "prompt, answer" in msg


def test_no_detectable_prompt_field(tmp_path):
    msg = error_of(load, write_rows(tmp_path, "x.csv", [{"text": "t", "response": "r"}]))
    assert "x.csv" in msg and "prompt" in msg and "text, response" in msg


def test_null_response_is_an_error(tmp_path):
    msg = error_of(load, write_rows(tmp_path, "z.jsonl", [ROWS[0], {"prompt": "p", "response": None}]))
    assert "z.jsonl row 2" in msg and "'response'" in msg and "null" in msg


@pytest.mark.parametrize("name,content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,response\n"),
                                          ("e.jsonl.gz", gzip.compress(b""))])
def test_empty_dataset(tmp_path, name, content):
    msg = error_of(load, write(tmp_path, name, content))
    assert name in msg and "no rows" in msg


def test_non_utf8_names_byte_and_line(tmp_path):
    raw = (json.dumps(ROWS[0]) + "\n").encode() + b'{"prompt": "caf\xe9", "response": "r"}\n'
    offset = raw.index(b"\xe9")
    msg = error_of(load, write(tmp_path, "latin.jsonl", raw))
    assert "latin.jsonl" in msg and f"byte {offset}" in msg and "line 2" in msg and "UTF-8" in msg
    msg = error_of(load, write(tmp_path, "latin.csv.gz", gzip.compress(b"prompt,response\nx,caf\xe9\n")))
    assert "latin.csv.gz" in msg and "byte 21" in msg and "line 2" in msg
    msg = error_of(load, write(tmp_path, "bom.csv", b"\xef\xbb\xbfprompt,response\nx,caf\xe9\n"))
    assert "byte 24" in msg and "line 2" in msg


def test_unreadable_json_line(tmp_path):
    text = json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "p", "response": \n'
    msg = error_of(load, write(tmp_path, "broken.jsonl", text))
    assert "broken.jsonl row 3" in msg and "JSON" in msg


def test_malformed_json_document_and_rows(tmp_path):
    assert "bad.json" in error_of(load, write(tmp_path, "bad.json", '[{"prompt": 1,'))
    msg = error_of(load, write(tmp_path, "two.json", json.dumps({"a": [], "b": []})))
    assert "two.json" in msg and "a, b" in msg
    msg = error_of(load, write(tmp_path, "strs.json", json.dumps(["just text"])))
    assert "strs.json row 1" in msg


def test_csv_row_with_missing_columns(tmp_path):
    msg = error_of(load, write(tmp_path, "short.csv", "prompt,response,category\np,r,c\nq,s\n"))
    assert "short.csv row 2" in msg and "fewer columns" in msg


def test_bad_gzip_unsupported_suffix_and_directory(tmp_path):
    assert "not a valid gzip" in error_of(load, write(tmp_path, "fake.jsonl.gz", b"plain text"))
    assert "unsupported file type" in error_of(load, write(tmp_path, "data.txt", "hello"))
    msg = error_of(load, str(tmp_path))
    assert "directory" in msg and "hf:" in msg


# ---------------------------------------------------------------- hf:


def test_hf_local_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    folder = tmp_path / "myset"
    folder.mkdir()
    write_rows(folder, "train.jsonl", ROWS)
    write_rows(folder, "test.jsonl", ROWS[:1])
    try:
        recs = load(f"hf:{folder}")
    except DataError as e:
        pytest.skip(f"datasets cannot load a local folder offline here: {e}")
    assert [(r.prompt, r.response, r.category) for r in recs] == [(r["prompt"], r["response"], r["category"])
                                                                  for r in ROWS]
    assert recs[0].id == "myset:1"
    assert [r.prompt for r in load(f"hf:{folder}:test")] == [ROWS[0]["prompt"]]
    spec = DataSpec(f"hf:{folder}", category="math")
    fp = data_fingerprint(spec, load_records(spec))
    assert fp["rows"] == 2 and fp["categories"] == {"math": 2}
    canonical = json.dumps([r.__dict__ for r in load_records(spec)], sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
    assert fp["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    msg = error_of(load, f"hf:{folder}:validation")
    assert f"hf:{folder}:validation" in msg


def test_builtin_name_wins_over_a_directory_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "harmful").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load("harmful:test") and len(load("harmful")) > 200
