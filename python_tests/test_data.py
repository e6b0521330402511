"""Tests of the data layer: the JSONL record format, the train/val split, the corpus builders
and the cached build.

Inputs are random (seeded from the test id, so a failure reproduces); corpus tests skip only
when the corpus's source package is not installed, and say which.
"""

import json
import os
import random
import string
import time
import zlib

import pytest

from moa_engine.data import (
    CORPORA,
    CorpusUnavailable,
    Record,
    build_corpora,
    domains_of,
    read_records,
    split_records,
    write_records,
)
from moa_engine.data.corpora import conversation_turns, docbook_paragraphs, pack_paragraphs, parse_obo_definitions

SMALL_CAP = 20


@pytest.fixture
def rng(request):
    """A random.Random seeded from the test id (shifted by MOA_TEST_SEED, as the op tests)."""
    salt = os.environ.get("MOA_TEST_SEED", "0")
    return random.Random(zlib.crc32(f"{salt}:{request.node.nodeid}".encode()))


def random_text(rng, low=1, high=60):
    alphabet = string.ascii_letters + string.digits + " .,;:!?-\"'\\/\n\té€日本語🙂{}[]"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))
    return text if text.strip() else text + "x"


def random_records(rng, n, domains=("alpha", "beta", "gamma")):
    records = []
    for _ in range(n):
        domain = rng.choice(domains)
        if rng.random() < 0.5:
            records.append(Record(domain, prompt=random_text(rng), response=random_text(rng)))
        else:
            records.append(Record(domain, text=random_text(rng, 1, 200)))
    return records


# ---------------------------------------------------------------------------------------------
# Records: round trip and errors
# ---------------------------------------------------------------------------------------------


def test_round_trip(tmp_path, rng):
    records = random_records(rng, 137)
    path = tmp_path / "records.jsonl"
    write_records(path, records)
    assert read_records(path) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(records)
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"], "temporary file left behind"


def test_write_is_atomic_on_failure(tmp_path, rng):
    path = tmp_path / "records.jsonl"
    original = random_records(rng, 5)
    write_records(path, original)

    def failing():
        yield from random_records(rng, 3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_records(path, failing())
    assert read_records(path) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_blank_lines_are_skipped(tmp_path, rng):
    records = random_records(rng, 4)
    lines = [json.dumps(r.to_dict()) for r in records]
    (tmp_path / "r.jsonl").write_text("\n" + "\n  \n".join(lines) + "\n\n", encoding="utf-8")
    assert read_records(tmp_path / "r.jsonl") == records


BAD_LINES = {
    "invalid_json": ('{"domain": "a", "text": "x"', "invalid JSON"),
    "not_object": ('["a", "b"]', "expected a JSON object, got list"),
    "unknown_field": ('{"domain": "a", "text": "x", "label": 3}', "unknown field(s) ['label']"),
    "missing_domain": ('{"text": "x"}', "missing field(s) ['domain']"),
    "missing_response": ('{"domain": "a", "prompt": "x"}', "missing field(s) ['response']"),
    "missing_prompt": ('{"domain": "a", "response": "x"}', "missing field(s) ['prompt']"),
    "only_domain": ('{"domain": "a"}', "missing field(s) ['prompt', 'response']"),
    "mixed": ('{"domain": "a", "prompt": "p", "response": "r", "text": "t"}', "mixes 'text' with 'prompt'/'response'"),
    "mixed_partial": ('{"domain": "a", "prompt": "p", "text": "t"}', "mixes 'text'"),
    "empty_text": ('{"domain": "a", "text": ""}', "field 'text' is an empty string"),
    "blank_domain": ('{"domain": "  ", "text": "x"}', "field 'domain' is an empty string"),
    "empty_response": ('{"domain": "a", "prompt": "p", "response": ""}', "field 'response' is an empty string"),
    "int_value": ('{"domain": "a", "prompt": "p", "response": 7}', "field 'response' must be a string, got int"),
    "null_value": ('{"domain": null, "text": "x"}', "field 'domain' must be a string, got NoneType"),
    "list_value": ('{"domain": "a", "text": ["x"]}', "field 'text' must be a string, got list"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_read_errors_name_file_line_and_problem(tmp_path, rng, case):
    bad, problem = BAD_LINES[case]
    good = [json.dumps(r.to_dict()) for r in random_records(rng, rng.randint(1, 9))]
    lineno = rng.randint(1, len(good) + 1)
    lines = good[: lineno - 1] + [bad] + good[lineno - 1 :]
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{lineno}: "), message
    assert problem in message, message


def test_record_constructor_validates():
    with pytest.raises(ValueError, match="mixes 'text'"):
        Record("a", prompt="p", response="r", text="t")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['response'\]"):
        Record("a", prompt="p")
    with pytest.raises(ValueError, match="must be a string, got int"):
        Record("a", text=3)
    with pytest.raises(ValueError, match="empty string"):
        Record("", text="x")


# ---------------------------------------------------------------------------------------------
# Split and domains
# ---------------------------------------------------------------------------------------------


def assignment(train, val):
    return {r: "train" for r in train} | {r: "val" for r in val}


def test_split_is_deterministic_and_complete(rng):
    records = random_records(rng, 400)
    seed = rng.randrange(1000)
    train, val = split_records(records, val_fraction=0.1, seed=seed)
    assert split_records(records, val_fraction=0.1, seed=seed) == (train, val)
    assert split_records(list(reversed(records)), val_fraction=0.1, seed=seed) == (train[::-1], val[::-1])
    assert sorted(train + val, key=records.index) == records
    assert set(train).isdisjoint(val)
    assert 0.03 < len(val) / len(records) < 0.2
    other_train, _ = split_records(records, val_fraction=0.1, seed=seed + 1)
    assert other_train != train, "the seed has no effect"


def test_split_keeps_old_assignments_when_records_are_added(rng):
    old = random_records(rng, 300)
    new = random_records(rng, 200)
    before = assignment(*split_records(old, val_fraction=0.2, seed=3))
    combined = new[:100] + old + new[100:]
    after = assignment(*split_records(combined, val_fraction=0.2, seed=3))
    assert {r: after[r] for r in old} == before


@pytest.mark.parametrize("sizes", [(1, 2, 3), (2, 2, 2), (50, 7, 2), (400, 1, 5)])
def test_split_gives_every_domain_validation(rng, sizes):
    records = []
    for i, n in enumerate(sizes):
        records += random_records(rng, n, domains=(f"d{i}",))
    rng.shuffle(records)
    train, val = split_records(records, val_fraction=0.05, seed=rng.randrange(1000))
    for i, n in enumerate(sizes):
        n_val = sum(r.domain == f"d{i}" for r in val)
        n_train = sum(r.domain == f"d{i}" for r in train)
        if n >= 2:
            assert n_val >= 1, f"domain d{i} with {n} records has no validation record"
            assert n_train >= 1, f"domain d{i} with {n} records has no training record"
        else:
            assert (n_train, n_val) == (1, 0)


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_records([], val_fraction=1.0)


def test_domains_of(rng):
    records = random_records(rng, 50, domains=("x", "y", "z"))
    first_seen = list(dict.fromkeys(r.domain for r in records))
    assert domains_of(records) == first_seen
    assert domains_of(records, ["z", "y", "x"]) == ["z", "y", "x"]
    with pytest.raises(ValueError, match=r"domain\(s\) \['w'\] have zero records"):
        domains_of(records, ["x", "y", "z", "w"])
    with pytest.raises(ValueError, match=r"outside the requested domains"):
        domains_of(records, ["x", "y"])


# ---------------------------------------------------------------------------------------------
# Corpus builders
# ---------------------------------------------------------------------------------------------


def build_or_skip(name, limit, seed):
    try:
        return list(CORPORA[name](limit, seed))
    except CorpusUnavailable as e:
        pytest.skip(f"corpus {name!r} unavailable: {e}")


@pytest.mark.parametrize("name", list(CORPORA))
def test_corpus_builder(name, rng):
    seed = rng.randrange(10_000)
    records = build_or_skip(name, SMALL_CAP, seed)
    assert 0 < len(records) <= SMALL_CAP
    if name != "finance":
        assert len(records) == SMALL_CAP, f"{name}: only {len(records)} records for a cap of {SMALL_CAP}"
    assert len({r.content_key() for r in records}) == len(records), "duplicate records"
    for r in records:
        assert isinstance(r, Record) and r.domain == name
        assert Record.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert list(CORPORA[name](SMALL_CAP, seed)) == records, "not deterministic for a fixed seed"


@pytest.mark.parametrize("name", [n for n in CORPORA if n != "finance"])
def test_corpus_seed_changes_the_draw(name):
    a = build_or_skip(name, SMALL_CAP, 1)
    b = build_or_skip(name, SMALL_CAP, 2)
    assert a != b


def test_corpora_are_independent_of_hash_seed(rng):
    """Builders must not depend on set order of strings (PYTHONHASHSEED) or of objects."""
    import subprocess
    import sys

    names = [n for n in CORPORA if n != "finance"]
    script = (
        "import sys; from moa_engine.data import CORPORA, CorpusUnavailable\n"
        "for name in sys.argv[1:]:\n"
        f"    try: print(name, [r.content_key() for r in CORPORA[name]({SMALL_CAP}, 7)])\n"
        "    except CorpusUnavailable: print(name, 'unavailable')\n"
    )
    outputs = []
    for hash_seed in rng.sample(range(1, 10_000), 2):
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        done = subprocess.run(
            [sys.executable, "-c", script, *names], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    assert len(outputs[0]) == len(names)
    for a, b in zip(*outputs):
        assert a == b, f"{a.split()[0]} differs between hash seeds"


def test_math_is_independent_of_global_random_state():
    import numpy as np

    random.seed(123)
    np.random.seed(123)
    first = build_or_skip("math", SMALL_CAP, 5)
    after_py, after_np = random.random(), np.random.random()
    random.seed(123)
    np.random.seed(123)
    assert (random.random(), np.random.random()) == (after_py, after_np), "builder changed the global state"
    random.seed(999)
    np.random.seed(999)
    assert build_or_skip("math", SMALL_CAP, 5) == first


def test_obo_parser():
    obo = [
        "format-version: 1.2\n",
        "[Term]\n",
        "id: HP:1\n",
        "name: Alpha thing\n",
        'def: "Has a \\"quoted\\" word." [ref]\n',
        "\n",
        "[Term]\n",
        "id: HP:2\n",
        "name: No definition\n",
        "[Term]\n",
        "name: Obsolete thing\n",
        'def: "Old."\n',
        "is_obsolete: true\n",
        "[Typedef]\n",
        "name: part_of\n",
        'def: "Not a term."\n',
        "[Term]\n",
        "name: Last\n",
        'def: "Final definition."\n',
    ]
    assert list(parse_obo_definitions(obo)) == [
        ("Alpha thing", 'Has a "quoted" word.'),
        ("Last", "Final definition."),
    ]


def test_conversation_turns():
    assert list(conversation_turns(["a", 1963, None, " ", "c"])) == [("a", "1963"), ("1963", "c")]
    assert list(conversation_turns(["only one"])) == []


def test_docbook_text():
    markup = (
        '<?xml version="1.0"?>\n<!DOCTYPE chapter PUBLIC "-//OASIS//DTD DocBook XML V4.1.2//EN" "x.dtd">\n'
        "<chapter><title>Accounts &amp; money</title><para>The <emphasis>basic</emphasis>\n idea is "
        '<link linkend="x">double entry</link> &app;.</para><!-- skip me --><sect1><para>Second &#233;'
        "</para></sect1></chapter>"
    )
    paragraphs = docbook_paragraphs(markup)
    assert paragraphs[:2] == ["Accounts & money", "The basic idea is double entry app."]
    assert paragraphs[2] == "Second é"
    chunks = list(pack_paragraphs(["a" * 10, "b" * 10, "c" * 10], limit=25))
    assert chunks == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10]


def test_finance_absent_is_a_clear_error(tmp_path):
    from moa_engine.data.corpora import build_finance

    with pytest.raises(CorpusUnavailable, match="gnucash-docs"):
        list(build_finance(5, 0, guide_dir=str(tmp_path)))


def test_finance_from_a_guide_folder(tmp_path):
    from moa_engine.data.corpora import build_finance

    body = " ".join(f"Word{i}" for i in range(40))
    for chapter in ("ch_a", "ch_b"):
        (tmp_path / f"{chapter}.xml").write_text(
            f"<chapter><title>{chapter}</title><para>{body} {chapter}.</para></chapter>", encoding="utf-8"
        )
    records = list(build_finance(10, 0, guide_dir=str(tmp_path)))
    assert sorted(r.text.split()[0] for r in records) == ["ch_a", "ch_b"]
    assert all(r.domain == "finance" and body in r.text for r in records)


# ---------------------------------------------------------------------------------------------
# The cached build
# ---------------------------------------------------------------------------------------------


def available_domains():
    names = []
    for name, corpus in CORPORA.items():
        try:
            next(iter(corpus(1, 0)))
        except CorpusUnavailable:
            continue
        names.append(name)
    return names


def test_build_corpora(tmp_path, rng):
    domains = [d for d in available_domains() if d != "finance"]
    if not domains:
        pytest.skip("no corpus is available")
    cap = rng.randint(15, 40)
    seed = rng.randrange(1000)
    cache = tmp_path / "cache"
    out = tmp_path / "out"

    result = build_corpora(out, domains=domains, max_per_domain=cap, seed=seed, cache_dir=cache, progress=False)
    assert result["cache_hit"] is False
    assert sorted(os.listdir(out)) == ["manifest.json", "train.jsonl", "val.jsonl"]
    train, val = read_records(out / "train.jsonl"), read_records(out / "val.jsonl")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["domains"] == domains and manifest["seed"] == seed
    assert set(manifest["sources"]) == set(domains)
    assert domains_of(train + val, domains) == domains
    records = train + val
    assert len(set(records)) == len(records), "duplicates across the build"
    for d in domains:
        n_train = sum(r.domain == d for r in train)
        n_val = sum(r.domain == d for r in val)
        assert 1 <= n_val and n_train + n_val <= cap
        assert manifest["counts"][d] == {"train": n_train, "val": n_val, "total": n_train + n_val}
    assert (train, val) == split_records(records, seed=seed)

    out2 = tmp_path / "out2"
    start = time.perf_counter()
    again = build_corpora(out2, domains=domains, max_per_domain=cap, seed=seed, cache_dir=cache, progress=False)
    assert again["cache_hit"] is True
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    assert time.perf_counter() - start < 5.0

    other = build_corpora(out2, domains=domains, max_per_domain=cap, seed=seed + 1, cache_dir=cache, progress=False)
    assert other["cache_hit"] is False
    assert read_records(out2 / "train.jsonl") != train


def test_build_corpora_without_cache_is_reproducible(tmp_path):
    domains = [d for d in ("medicine", "dialogue", "code") if d in available_domains()][:2]
    if not domains:
        pytest.skip("no corpus is available")
    for i in (1, 2):
        build_corpora(
            tmp_path / f"o{i}", domains=domains, max_per_domain=25, cache_dir=tmp_path / f"c{i}", progress=False
        )
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()


def test_build_corpora_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_ENGINE_CACHE", str(tmp_path / "envcache"))
    result = build_corpora(tmp_path / "out", domains="code", max_per_domain=5, progress=False)
    assert result["cache_entry"].startswith(str(tmp_path / "envcache" / "data"))
    assert result["counts"]["code"]["total"] == 5


def test_build_corpora_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['nope'\]; known domains"):
        build_corpora(tmp_path, domains="code,nope", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_per_domain must be >= 1"):
        build_corpora(tmp_path, domains="code", max_per_domain=0, cache_dir=tmp_path)


def test_cli(tmp_path, capsys):
    import argparse

    from moa_engine.data import add_data_subcommand

    parser = argparse.ArgumentParser(prog="moa")
    add_data_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "data",
            "build",
            "--out",
            str(tmp_path / "o"),
            "--domains",
            "code",
            "--max-per-domain",
            "7",
            "--seed",
            "4",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    n_train = len(read_records(tmp_path / "o" / "train.jsonl"))
    n_val = len(read_records(tmp_path / "o" / "val.jsonl"))
    assert n_train + n_val == 7
    assert any(line.split()[:4] == ["code", str(n_train), str(n_val), "7"] for line in table.splitlines()), table
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "build", "--out", "x", "--domains", "bogus"])
