"""The trainer's data layer: every public layout read from small files, normalised exactly per method;
mixtures, weights and test splits; and bad data refused with a message that says where and what."""

from __future__ import annotations

import json
import logging
import runpy
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment_trainer.data import DataError, load_stage_data, normalise_messages, normalise_preference
from alignment_trainer.recipe import Recipe

pytestmark = pytest.mark.trainer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(method, *sources, **fields):
    """A recipe for `method` over `sources` (paths, or dicts of DatasetArgs)."""
    ds = [s if isinstance(s, dict) else {"path": str(s)} for s in sources]
    return Recipe(method=method, model={"model_name_or_path": "unused"}, datasets=ds, output_dir="unused", **fields)


def rows(method, *sources, split="train", **fields):
    return load_stage_data(recipe(method, *sources, **fields))[split].to_list()


PAIR_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
    {"prompt": [system("Be brief."), user("Capital of France?")], "chosen": [assistant("Paris.")],
     "rejected": [assistant("I don't know.")]},
]
PAIRS = [
    {"prompt": [user("What is 2+2?")], "chosen": [assistant("4.")], "rejected": [assistant("5.")]},
    {"prompt": [system("Be brief."), user("Capital of France?")], "chosen": [assistant("Paris.")],
     "rejected": [assistant("I don't know.")]},
]


@pytest.fixture
def prefs(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", PAIR_ROWS)


# ---------------------------------------------------------------------------- layouts

def test_chat_messages_and_sharegpt(tmp_path):
    chat = [system("Be kind."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")]
    a = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat, "id": 7}])
    b = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}])
    c = write_jsonl(tmp_path / "oasst_export.jsonl", [{"messages": [       # OASST-style export
        {"role": "prompter", "text": "Hi"}, {"role": "assistant", "text": "Hello!"}]}])
    assert rows("sft", a, b, c) == [{"messages": chat}] + [{"messages": [user("Hi"), assistant("Hello!")]}] * 2


def test_explicit_prompt_preferences(prefs):
    assert rows("dpo", prefs) == PAIRS
    assert rows("simpo", prefs) == rows("orpo", prefs) == rows("ipo", prefs) == PAIRS


def test_ultrafeedback_binarized_prompt_implicit_in_conversations(tmp_path):
    conv = lambda reply: [user("Name a colour."), assistant(reply)]  # noqa: E731
    path = write_jsonl(tmp_path / "uf.jsonl", [{
        "prompt": "Name a colour.", "prompt_id": "abc", "chosen": conv("Blue."), "rejected": conv("Seven."),
        "messages": conv("Blue."), "score_chosen": 9.0, "score_rejected": 2.0}])
    want = {"prompt": [user("Name a colour.")], "chosen": [assistant("Blue.")], "rejected": [assistant("Seven.")]}
    assert rows("dpo", path) == [want]
    # SFT on preference data: the chosen reply, prompt masked (prompt-completion).
    assert rows("sft", path) == [{"prompt": [user("Name a colour.")], "completion": [assistant("Blue.")]}]


def test_hh_rlhf_transcripts(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How do I boil an egg?"
    path = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": shared + "\n\nAssistant: Simmer it for eight minutes.",
        "rejected": shared + "\n\nAssistant: No idea."}])
    assert rows("dpo", path) == [{
        "prompt": [user("Hi there"), assistant("Hello."), user("How do I boil an egg?")],
        "chosen": [assistant("Simmer it for eight minutes.")], "rejected": [assistant("No idea.")]}]
    # The variant with the transcript as `prompt` (Dahoas/full-hh-rlhf).
    path = write_jsonl(tmp_path / "hh_prompt.jsonl", [{
        "prompt": shared + "\n\nAssistant:", "response": " Simmer it.", "chosen": " Simmer it.", "rejected": " No."}])
    assert rows("dpo", path) == [{
        "prompt": [user("Hi there"), assistant("Hello."), user("How do I boil an egg?")],
        "chosen": [assistant(" Simmer it.")], "rejected": [assistant(" No.")]}]


def test_stanford_shp_labels_pick_the_preferred_reference(tmp_path):
    path = write_jsonl(tmp_path / "shp.jsonl", [
        {"post_id": "p", "history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.",
         "human_ref_B": "Because.", "labels": 1, "score_A": 10, "score_B": 2},
        {"post_id": "q", "history": "Best pet?", "human_ref_A": "A rock.", "human_ref_B": "A dog.",
         "labels": 0, "score_A": 1, "score_B": 8}])
    assert rows("dpo", path) == [
        {"prompt": [user("Why is the sky blue?")], "chosen": [assistant("Rayleigh scattering.")],
         "rejected": [assistant("Because.")]},
        {"prompt": [user("Best pet?")], "chosen": [assistant("A dog.")], "rejected": [assistant("A rock.")]}]


def test_oasst_tree_pairs_siblings_by_rank(tmp_path):
    def msg(mid, parent, role, text, rank=None, deleted=False):
        return {"message_id": mid, "parent_id": parent, "text": text, "role": role, "rank": rank,
                "deleted": deleted, "lang": "en"}
    path = write_jsonl(tmp_path / "oasst.jsonl", [
        msg("q", None, "prompter", "Tell me a fruit."),
        msg("a1", "q", "assistant", "A banana.", rank=1),
        msg("a0", "q", "assistant", "An apple.", rank=0),
        msg("a2", "q", "assistant", "A rock.", rank=2),
        msg("ax", "q", "assistant", "Deleted.", rank=3, deleted=True),
        msg("q2", "a0", "prompter", "Another?"),
        msg("b0", "q2", "assistant", "A pear.", rank=0),
        msg("b1", "q2", "assistant", "No.", rank=1),
        msg("lonely", "q2", "assistant", "Unranked."),
    ])
    first = [user("Tell me a fruit.")]
    assert rows("dpo", path) == [
        {"prompt": first, "chosen": [assistant("An apple.")], "rejected": [assistant("A banana.")]},
        {"prompt": first, "chosen": [assistant("An apple.")], "rejected": [assistant("A rock.")]},
        {"prompt": first + [assistant("An apple."), user("Another?")], "chosen": [assistant("A pear.")],
         "rejected": [assistant("No.")]},
    ]


def test_halos_binary_and_pairwise_feedback_json(tmp_path):
    p = [user("Say hi.")]
    binary = tmp_path / "binary.json"
    binary.write_text(json.dumps([
        {"prompt_id": "x", "prompt": p, "output": [assistant("Hi!")], "label": 1, "reward": 0.9,
         "type": "binary_feedback", "split": "train"},
        {"prompt_id": "x", "prompt": p, "output": [assistant("Go away.")], "label": 0, "reward": 0.1,
         "type": "binary_feedback"},                                   # untagged: in every split, as in HALOs
        {"prompt_id": "y", "prompt": p, "output": [assistant("Held out.")], "label": 1, "reward": 0.5,
         "type": "binary_feedback", "split": "test"}]))
    pairwise = tmp_path / "pairwise.json"
    pairwise.write_text(json.dumps([
        {"prompt_id": "x", "prompt": p, "output_A": [assistant("Go away.")], "output_B": [assistant("Hi!")],
         "label": 0, "reward_A": 0.1, "reward_B": 0.9, "reward_difference": 0.8, "type": "pairwise_feedback"}]))
    assert rows("kto", binary) == [
        {"prompt": p, "completion": [assistant("Hi!")], "label": True},
        {"prompt": p, "completion": [assistant("Go away.")], "label": False}]
    assert rows("kto", {"path": str(binary), "split": "test"}) == [
        {"prompt": p, "completion": [assistant("Go away.")], "label": False},
        {"prompt": p, "completion": [assistant("Held out.")], "label": True}]
    assert rows("dpo", pairwise) == [{"prompt": p, "chosen": [assistant("Hi!")], "rejected": [assistant("Go away.")]}]


def test_kto_labels_and_paired_data_unpaired(tmp_path, prefs):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": [user("Hi")], "completion": [assistant("Whatever.")], "label": False}])
    assert rows("kto", path) == [
        {"prompt": [user("Hi")], "completion": [assistant("Hello!")], "label": True},
        {"prompt": [user("Hi")], "completion": [assistant("Whatever.")], "label": False}]
    # SFT on labelled data: the desirable completions, prompt masked.
    assert rows("sft", path) == [{"prompt": [user("Hi")], "completion": [assistant("Hello!")]}]
    assert rows("kto", prefs)[:2] == [
        {"prompt": [user("What is 2+2?")], "completion": [assistant("4.")], "label": True},
        {"prompt": [user("What is 2+2?")], "completion": [assistant("5.")], "label": False}]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(PAIR_ROWS[:1]).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(PAIR_ROWS[:1]),
        "test": datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}]),
    }).save_to_disk(str(tmp_path / "dict"))
    assert rows("dpo", tmp_path / "one") == PAIRS[:1]
    assert rows("dpo", {"path": str(tmp_path / "dict"), "split": "test"}) == [
        {"prompt": [user("Q?")], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}]
    with pytest.raises(DataError, match=r"no split 'validation'; splits: \['test', 'train'\]"):
        rows("dpo", {"path": str(tmp_path / "dict"), "split": "validation"})


def test_parquet_csv_and_json(tmp_path):
    pq.write_table(pa.Table.from_pylist(PAIR_ROWS[1:]), tmp_path / "p.parquet")
    (tmp_path / "array.json").write_text(json.dumps(PAIR_ROWS))
    datasets.Dataset.from_list(PAIR_ROWS[:1]).to_json(str(tmp_path / "lines.json"))   # JSON Lines
    assert rows("dpo", tmp_path / "array.json", tmp_path / "lines.json") == PAIRS + PAIRS[:1]
    (tmp_path / "k.csv").write_text('prompt,completion,label\nHi,"Hello, friend.",true\nHi,Bye.,false\n')
    assert rows("dpo", tmp_path / "p.parquet") == PAIRS[1:]
    assert [r["label"] for r in rows("kto", tmp_path / "k.csv")] == [True, False]
    assert rows("kto", tmp_path / "k.csv")[0]["completion"] == [assistant("Hello, friend.")]


def test_data_directory_goes_through_load_dataset(tmp_path, monkeypatch):
    """A path that is no file and no save_to_disk dir is what load_dataset reads (a Hub id or a data dir)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", PAIR_ROWS[:1])
    assert rows("dpo", tmp_path / "repo") == PAIRS[:1]


# ---------------------------------------------------------------------------- mixtures and splits

def test_mixture_weights_columns_and_seed(tmp_path, prefs):
    many = write_jsonl(tmp_path / "many.jsonl", [
        {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "junk": {"x": i}} for i in range(40)])
    mix = [{"path": many, "weight": 0.25, "columns": ["prompt", "chosen", "rejected"]}, {"path": prefs}]
    out = rows("dpo", *mix)
    assert len(out) == 10 + 2 and out[-2:] == PAIRS
    assert rows("dpo", *mix) == out                                    # deterministic
    other = rows("dpo", *mix, training={"seed": 7})
    assert len(other) == 12 and other != out                           # the seed picks the rows
    picked = [int(r["prompt"][0]["content"][1:]) for r in out[:10]]
    assert picked == sorted(picked)                                    # original order kept


def test_sft_mixture_of_chats_and_preferences_is_prompt_completion(tmp_path, prefs):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("Hi"), assistant("Hello."), user("Again"),
                                                               assistant("Hello again.")]}])
    assert rows("sft", chat, prefs) == [
        {"prompt": [user("Hi"), assistant("Hello."), user("Again")], "completion": [assistant("Hello again.")]},
        {"prompt": [user("What is 2+2?")], "completion": [assistant("4.")]},
        {"prompt": PAIRS[1]["prompt"], "completion": [assistant("Paris.")]}]


def test_eval_keeps_pairs_when_every_source_is_pairwise(tmp_path, prefs):
    assert rows("eval", prefs) == PAIRS
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("Hi"), assistant("Hello.")]}])
    assert rows("eval", chat, prefs) == [
        {"messages": [user("Hi"), assistant("Hello.")]},
        {"messages": [user("What is 2+2?"), assistant("4.")]},
        {"messages": PAIRS[1]["prompt"] + [assistant("Paris.")]}]
    assert normalise_preference(datasets.Dataset.from_list(PAIR_ROWS[:1])).to_list() == PAIRS[:1]
    assert normalise_messages(PAIRS[:1]).to_list() == [{"messages": [user("What is 2+2?"), assistant("4.")]}]


def test_test_split_from_size_or_test_datasets(tmp_path, prefs):
    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"}
                                                 for i in range(20)])
    data = load_stage_data(recipe("dpo", many, test_split_size=5))
    assert (len(data["train"]), len(data["test"])) == (15, 5)
    prompts = lambda ds: {r["prompt"][0]["content"] for r in ds}  # noqa: E731
    assert not prompts(data["train"]) & prompts(data["test"])
    assert prompts(load_stage_data(recipe("dpo", many, test_split_size=5))["test"]) == prompts(data["test"])
    assert len(load_stage_data(recipe("dpo", many, test_split_size=0.1))["test"]) == 2
    data = load_stage_data(recipe("dpo", many, test_datasets=[{"path": prefs}]))
    assert len(data["train"]) == 20 and data["test"].to_list() == PAIRS
    assert list(load_stage_data(recipe("dpo", many))) == ["train"]


def test_identical_chosen_and_rejected_is_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    with caplog.at_level(logging.WARNING, logger="alignment_trainer"):
        assert len(rows("dpo", path)) == 1
    assert "chosen == rejected" in caplog.text


# ---------------------------------------------------------------------------- bad data

def test_missing_rejected_column(tmp_path):
    path = write_jsonl(tmp_path / "norej.jsonl", [{"prompt": "Q", "chosen": "A"}])
    with pytest.raises(DataError) as e:
        rows("dpo", path)
    assert f"dataset {path} split train: line 1: column 'rejected'" in str(e.value)
    assert "is missing" in str(e.value) and "accepted layouts" in str(e.value)
    # Missing from one row only: that row's line.
    path = write_jsonl(tmp_path / "some.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"},
                                                 {"prompt": "Q", "chosen": "A"}])
    with pytest.raises(DataError, match=rf"dataset {path} split train: line 2: column 'rejected': "
                                        r"column 'rejected' is missing"):
        rows("dpo", path)


def test_empty_dataset_and_empty_after_weighting(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"dataset {empty} split train: is empty"):
        rows("sft", empty)
    one = write_jsonl(tmp_path / "one.jsonl", [{"messages": [user("Hi"), assistant("Hello.")]}])
    with pytest.raises(DataError, match=rf"dataset {one} split train: weight 0.1 keeps no example of 1"):
        rows("sft", {"path": one, "weight": 0.1})


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIR_ROWS[0]) + "\n\n" + '{"prompt": "Q", "chosen": "A",\n')
    with pytest.raises(DataError, match=rf"dataset {path} split train: line 3: malformed JSON"):
        rows("dpo", path)


def test_roles_that_do_not_alternate(tmp_path):
    path = write_jsonl(tmp_path / "roles.jsonl", [
        {"messages": [user("Hi"), assistant("Hello.")]},
        {"messages": [user("Hi"), user("Hello?"), assistant("Yes.")]}])
    with pytest.raises(DataError) as e:
        rows("sft", path)
    msg = str(e.value)
    assert f"dataset {path} split train: line 2: column 'messages': roles must alternate user/assistant" in msg
    assert "message 1 is 'user' where 'assistant' was expected" in msg
    # The same in a save_to_disk dataset: rows are 0-based.
    datasets.Dataset.from_list([{"prompt": [user("Hi"), system("Late system")], "chosen": "A", "rejected": "B"}]
                               ).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(DataError, match=r"split train: row 0: column 'prompt': roles must alternate"):
        rows("dpo", tmp_path / "disk")


def test_a_few_malformed_rows_may_be_skipped_when_allowed(tmp_path, caplog):
    """Scraped Hub sets carry the odd broken row: maxInvalidFraction skips them, counted and logged."""
    good = [{"prompt": f"Q{i}", "chosen": "A", "rejected": "B"} for i in range(98)]
    path = write_jsonl(tmp_path / "hh.jsonl", good[:10] + [{"prompt": "Q", "chosen": "", "rejected": "B"}]
                       + good[10:50] + [{"prompt": "Q", "chosen": "A", "rejected": ""}] + good[50:])
    with pytest.raises(DataError, match=r"line 11: column 'chosen': content is empty"):
        rows("dpo", path)  # strict by default: the first bad row stops the stage
    with caplog.at_level(logging.WARNING, logger="alignment_trainer"):
        kept = rows("dpo", {"path": path, "max_invalid_fraction": 0.05})
    assert len(kept) == 98
    assert "skipped 2 of 100 malformed rows" in caplog.text and "line 11" in caplog.text
    with pytest.raises(DataError) as e:
        rows("dpo", {"path": path, "max_invalid_fraction": 0.01})
    assert "line 11: column 'chosen'" in str(e.value) and "2 invalid rows so far exceed maxInvalidFraction 0.01" in str(e.value)


@pytest.mark.parametrize("bad, problem", [
    ({"prompt": "Q", "chosen": "", "rejected": "B"}, "column 'chosen': content is empty"),
    ({"prompt": "Q", "chosen": 3, "rejected": "B"}, "column 'chosen': expected text or a list of messages"),
    ({"prompt": [{"role": "user", "content": None}], "chosen": "A", "rejected": "B"},
     "column 'prompt': content must be a string"),
    ({"prompt": [{"role": "robot", "content": "Q"}], "chosen": "A", "rejected": "B"}, "unknown role 'robot'"),
    ({"prompt": [user("Q"), assistant("A")], "chosen": "A", "rejected": "B"}, "must end with a user turn"),
    ({"prompt": "Q", "chosen": [assistant("A"), assistant("B")], "rejected": "B"}, "one assistant message"),
])
def test_malformed_rows(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(DataError, match=rf"split train: line 1: .*{problem}"):
        rows("dpo", path)


def test_method_needs_its_kind_of_data(tmp_path, prefs):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("Hi"), assistant("Hello.")]}])
    with pytest.raises(DataError, match=rf"dataset {chat} split train: method dpo needs pairwise preference data"):
        rows("dpo", chat, prefs)
    with pytest.raises(DataError, match="method kto needs labelled completions"):
        rows("kto", chat)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"no known layout for columns \['text'\]; accepted layouts: messages"):
        rows("sft", unknown)


# ---------------------------------------------------------------------------- examples/data

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.parametrize("method, train, test, n_train, n_test, columns", [
    ("sft", "sft.jsonl", "sft_test.jsonl", 400, 50, ["messages"]),
    ("dpo", "prefs.jsonl", "prefs_test.jsonl", 400, 60, ["prompt", "chosen", "rejected"]),
    ("kto", "kto.jsonl", "kto_test.jsonl", 400, 60, ["prompt", "completion", "label"]),
    ("sft", "prefs.jsonl", "prefs_test.jsonl", 400, 60, ["prompt", "completion"]),
])
def test_example_datasets_load(method, train, test, n_train, n_test, columns):
    data = load_stage_data(recipe(method, EXAMPLES / train, test_datasets=[{"path": str(EXAMPLES / test)}]))
    assert (len(data["train"]), len(data["test"])) == (n_train, n_test)
    assert data["train"].column_names == columns
    if method == "kto":
        assert sum(data["train"]["label"]) == n_train // 2


def test_example_datasets_match_their_generator(tmp_path):
    """The committed files are what make_data.py writes (rerun it after editing it)."""
    runpy.run_path(str(EXAMPLES / "make_data.py"), run_name="make_data")["main"](tmp_path)
    for path in sorted(tmp_path.glob("*.jsonl")):
        assert path.read_bytes() == (EXAMPLES / path.name).read_bytes(), f"examples/data/{path.name} drifted"
    assert len(list(tmp_path.glob("*.jsonl"))) == 7


# ---------------------------------------------------------------------------- the files people have

def _compress(path, suffix: str, data: bytes):
    import bz2
    import gzip
    import lzma

    import zstandard

    packed = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
              ".zst": zstandard.ZstdCompressor().compress}[suffix](data)
    path.write_bytes(packed)
    return path


def test_jsonl_with_a_byte_order_mark_and_crlf_line_endings(tmp_path):
    """What Windows tools (Excel's 'UTF-8' export, PowerShell's Out-File) write."""
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in PAIR_ROWS).encode())
    assert rows("dpo", path) == PAIRS
    bad = tmp_path / "windows-bad.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + (json.dumps(PAIR_ROWS[0]) + "\r\n" + '{"prompt": "Q"\r\n').encode())
    with pytest.raises(DataError, match=rf"dataset {bad} split train: line 2: malformed JSON"):
        rows("dpo", bad)


@pytest.mark.parametrize("name", ["p.jsonl.gz", "p.json.gz", "p.jsonl.zst", "p.jsonl.bz2", "p.jsonl.xz",
                                  "p.csv.gz"])
def test_compressed_files(tmp_path, name):
    if ".csv" in name:
        text = "\ufeffprompt,chosen,rejected\r\nWhat is 2+2?,4.,5.\r\n"
        expected = PAIRS[:1]
    elif ".json." in name:
        text, expected = json.dumps(PAIR_ROWS), PAIRS
    else:
        text, expected = "".join(json.dumps(r) + "\n" for r in PAIR_ROWS), PAIRS
    path = _compress(tmp_path / name, "." + name.rsplit(".", 1)[1], text.encode())
    assert rows("dpo", path) == expected


def test_a_corrupt_compressed_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 not gzip at all")
    with pytest.raises(DataError, match=rf"dataset {path} split train: cannot decompress \(.gz\)"):
        rows("dpo", path)


def test_csv_answers_that_look_like_numbers_stay_text(tmp_path):
    path = tmp_path / "math.csv"
    path.write_text('prompt,chosen,rejected\nWhat is 6*7?,42,41\nWrite 1000 in E notation.,1e3,1000.0\n'
                    'A bond number?,007,7\n"Say ""hi"", twice.","hi, hi",hi\n')
    got = rows("dpo", path)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in got] == [
        ("42", "41"), ("1e3", "1000.0"), ("007", "7"), ("hi, hi", "hi")]
    assert got[3]["prompt"] == [user('Say "hi", twice.')]
    short = tmp_path / "short.csv"
    short.write_text("prompt,chosen,rejected\nQ,A,B\nQ2,A2\n")
    with pytest.raises(DataError, match=rf"dataset {short} split train: line 3: column 'rejected': column 'rejected' is missing"):
        rows("dpo", short)


def test_openai_content_parts_are_joined_and_other_parts_refused(tmp_path):
    parts = [{"type": "text", "text": "Look at this."}, {"type": "text", "text": "What is it?"}]
    chat = [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    path = write_jsonl(tmp_path / "parts.jsonl", [{"messages": chat}])
    assert rows("sft", path) == [{"messages": [user("Look at this.\nWhat is it?"), assistant("A cat.")]}]
    image = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                          {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]},
             assistant("A cat.")]
    bad = write_jsonl(tmp_path / "image.jsonl", [{"messages": chat}, {"messages": image}])
    with pytest.raises(DataError) as e:
        rows("sft", bad)
    assert str(e.value).startswith(f"dataset {bad} split train: line 2: column 'messages': content part 1 is "
                                   "'image_url': only text parts")


def test_a_messages_column_holding_a_json_string_says_so(tmp_path):
    chat = [user("Hi"), assistant("Hello!")]
    path = write_jsonl(tmp_path / "stringified.jsonl", [{"messages": json.dumps(chat)}])
    with pytest.raises(DataError) as e:
        rows("sft", path)
    assert str(e.value).startswith(f"dataset {path} split train: line 1: column 'messages': holds a JSON string that "
                                   "encodes a list of 2 messages, not the messages themselves")
    assert "must end with" not in str(e.value)
    csv_path = tmp_path / "chats.csv"   # CSV cells cannot hold lists: the usual way this happens
    csv_path.write_text('messages\n"' + json.dumps(chat).replace('"', '""') + '"\n')
    with pytest.raises(DataError, match=rf"dataset {csv_path} split train: line 2: column 'messages': holds a JSON string"):
        rows("sft", csv_path)
    # Plain text that merely starts with a bracket is still a prompt.
    assert rows("dpo", write_jsonl(tmp_path / "b.jsonl", [{"prompt": "[1, 2] sorted?", "chosen": "Yes.",
                                                               "rejected": "No."}]))[0]["prompt"] == [user("[1, 2] sorted?")]


def test_a_mixture_of_these_files_trains(tmp_path, tiny_model, data_dir, kit):
    """A DPO stage on a BOM+CRLF .jsonl.zst, a .json.gz and a CSV of the same pairs trains (loss is finite)."""
    import math

    pairs = [json.loads(line) for line in (data_dir / "prefs.jsonl").read_text().splitlines()][:48]
    crlf = _compress(tmp_path / "a.jsonl.zst", ".zst",
                     b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in pairs[:16]).encode())
    gz = _compress(tmp_path / "b.json.gz", ".gz", json.dumps(pairs[16:32]).encode())
    import csv as csv_module
    with (tmp_path / "c.csv").open("w", newline="") as f:
        w = csv_module.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        for r in pairs[32:]:
            w.writerow([r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]])
    recipe = kit.write_recipe(tmp_path, "dpo", tiny_model, [str(crlf), str(gz), str(tmp_path / "c.csv")],
                              training={"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64,
                                        "logging_steps": 1, "save_steps": 100})
    result = kit.run_in_process(recipe)
    losses = kit.losses(tmp_path / "out")
    assert result is not None and len(losses) == 2 and all(math.isfinite(x) for x in losses)
