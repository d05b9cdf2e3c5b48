"""A stage's data: read the mixture, recognise each layout, check every row, normalise per method.

    data = load_stage_data(recipe)      # DatasetDict: "train", and "test" when one is configured

What the training stages get (conversational: lists of {"role", "content"} messages):

    sft                     messages                      every source a chat
                            prompt, completion            when any source is preference or
                                                          prompt/completion data: chosen replies
                                                          with the prompt masked; chats are cut
                                                          before their last reply
    dpo, ipo, orpo, simpo   prompt, chosen, rejected      prompt ends with a user turn
    kto                     prompt, completion, label     pairs become one desirable and one
                                                          undesirable row
    eval                    prompt, chosen, rejected      when every source is pairwise
                            messages                      otherwise (chosen / desirable replies)

Sources (recipe.datasets, a mixture): a local .jsonl/.json/.csv file (UTF-8, a byte-order mark
and CRLF line endings are fine; also compressed: .gz, .bz2, .xz, .zst; CSV values are all read
as text), a .parquet file, a directory
written by `datasets` save_to_disk (a DatasetDict directory gives its `split`), or a Hub id.
`weight` keeps that fraction of a source's examples (a seeded subsample, order kept), `columns`
keeps only those columns before the layout is recognised. The layouts are in formats.py.

The test split is recipe.test_datasets (read like the training mixture) or test_split_size
examples (a count, or a fraction below 1) held out of the training mixture with the seed. It is
carved before pairs are unpaired for KTO, so no prompt has one reply in train and one in test.

Bad data fails here, before a model is loaded, with a DataError naming the dataset and split,
the row (0-based) or JSONL line (1-based), the column and what would be accepted.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.table import InMemoryTable

from . import formats
from .formats import RowError
from .recipe import METHODS, DatasetArgs, Recipe

log = logging.getLogger("alignment_trainer")

MESSAGES = List({"role": Value("string"), "content": Value("string")})
SCHEMAS = {
    "messages": Features({"messages": MESSAGES}),
    "preference": Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES}),
    "unpaired": Features({"prompt": MESSAGES, "completion": MESSAGES, "label": Value("bool")}),
    "prompt_completion": Features({"prompt": MESSAGES, "completion": MESSAGES}),
}


class DataError(ValueError):
    """A dataset the stage cannot train on; the message says where and what is accepted."""


# ---------------------------------------------------------------------------- entry point

def load_stage_data(recipe: Recipe) -> DatasetDict:
    """The stage's train (and test) split, normalised for recipe.method."""
    seed = recipe.training.seed
    train = load_mixture(recipe.datasets, seed)
    test: list[dict] = []
    if recipe.test_datasets:
        test = load_mixture(recipe.test_datasets, seed)
    elif recipe.test_split_size is not None:
        train, test = split_off(train, recipe.test_split_size, seed)
    schema = output_schema(recipe.method, train + test)
    out = DatasetDict({"train": to_schema(train, schema, recipe.method)})
    if test:
        out["test"] = to_schema(test, schema, recipe.method)
    return out


def load_mixture(sources: list[DatasetArgs], seed: int) -> list[dict]:
    """Every source read, checked and weighted, concatenated in order (tagged with its source)."""
    examples: list[dict] = []
    for k, args in enumerate(sources):
        rows = load_examples(args)
        kept = subsample(rows, args.weight, seed + k)
        if not kept:
            raise DataError(f"dataset {describe(args)}: weight {args.weight} keeps no example of {len(rows)}")
        examples += [dict(ex, _source=describe(args)) for ex in kept]
    return examples


def split_off(examples: list[dict], size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): `size` rows (>= 1) or that fraction (< 1) held out, chosen with the seed."""
    n = int(size) if size >= 1 else int(size * len(examples) + 0.5)
    if not 1 <= n < len(examples):
        raise DataError(f"test_split_size {size}: holds out {n} of {len(examples)} training examples; "
                        f"it must leave at least one on each side")
    held = set(random.Random(seed).sample(range(len(examples)), n))
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def subsample(examples: list[dict], weight: float, seed: int) -> list[dict]:
    """weight * n examples (rounded half up), picked with the seed, in their original order."""
    if weight >= 1:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), int(weight * len(examples) + 0.5)))
    return [examples[i] for i in keep]


# ---------------------------------------------------------------------------- per-method schema

def kind(example: dict) -> str:
    return "preference" if "chosen" in example else "unpaired" if "label" in example else "messages"


def output_schema(method: str, examples: list[dict]) -> str:
    """The normalised layout for the method's data kind (recipe.METHODS)."""
    kinds = {kind(ex) for ex in examples}
    sources = lambda k: sorted({ex["_source"] for ex in examples if kind(ex) == k})  # noqa: E731
    info = METHODS[method]
    if not info.trains:  # eval: held-out pairs, or chats for loss/perplexity
        return "preference" if kinds == {"preference"} else "messages"
    if info.data == "pairwise":
        if kinds - {"preference"}:
            bad = sources("messages") or sources("unpaired")
            raise DataError(f"dataset {bad[0]}: method {method} needs pairwise preference data "
                            f"(prompt/chosen/rejected or a layout that gives pairs); it has none")
        return "preference"
    if info.data == "unpaired":
        if "messages" in kinds:
            raise DataError(f"dataset {sources('messages')[0]}: method {method} needs labelled completions "
                            f"(prompt/completion/label) or pairs (prompt/chosen/rejected); got chats without labels")
        return "unpaired"
    return "messages" if kinds == {"messages"} else "prompt_completion"     # chat (sft)


def to_schema(examples: list[dict], schema: str, method: str) -> Dataset:
    rows = []
    for ex in examples:
        rows += convert(ex, schema)
    if not rows:
        raise DataError(f"method {method}: no usable example in {sorted({ex['_source'] for ex in examples})} "
                        f"(SFT and eval keep only desirable replies of labelled data)")
    if schema == "preference":
        warn_identical(rows)
    if schema == "unpaired" and len({r["label"] for r in rows}) == 1:
        log.warning("%s: every completion is labelled %s; KTO learns most from both kinds",
                    method, rows[0]["label"])
    # Straight to Arrow: from_list's per-value feature encoding is ten times slower.
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[schema].arrow_schema)
    return Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=SCHEMAS[schema]))


def convert(ex: dict, schema: str) -> list[dict]:
    """One normalised example in the target schema (zero rows: undesirable data for SFT)."""
    k = kind(ex)
    if schema == k:
        return [{key: ex[key] for key in SCHEMAS[schema]}]
    if schema == "unpaired" and k == "preference":
        return [{"prompt": ex["prompt"], "completion": ex["chosen"], "label": True},
                {"prompt": ex["prompt"], "completion": ex["rejected"], "label": False}]
    # Supervised views: the chosen (or desirable) reply after the prompt.
    if k == "messages":
        prompt, reply = ex["messages"][:-1], ex["messages"][-1:]
    elif k == "preference":
        prompt, reply = ex["prompt"], ex["chosen"]
    elif ex["label"]:
        prompt, reply = ex["prompt"], ex["completion"]
    else:
        return []
    if schema == "messages":
        return [{"messages": prompt + reply}]
    return [{"prompt": prompt, "completion": reply}]


def warn_identical(rows: list[dict]) -> None:
    same = [i for i, r in enumerate(rows) if r["chosen"] == r["rejected"]]
    if same:
        log.warning("%d preference rows have chosen == rejected (first: normalised row %d); they carry no signal",
                    len(same), same[0])


# ---------------------------------------------------------------------------- public helpers

def normalise(dataset: Dataset | list[dict], method: str, name: str = "<dataset>") -> Dataset:
    """Rows of any recognised layout, normalised as load_stage_data would for `method`."""
    examples = _examples(dataset, name)
    return to_schema(examples, output_schema(method, examples), method)


def normalise_preference(dataset: Dataset | list[dict], name: str = "<dataset>") -> Dataset:
    """prompt/chosen/rejected rows; DataError when the layout gives no pairs."""
    return normalise(dataset, "dpo", name)


def normalise_messages(dataset: Dataset | list[dict], name: str = "<dataset>") -> Dataset:
    """messages rows: chats as they are, pairs as prompt + chosen, labelled data's desirable replies."""
    return to_schema(_examples(dataset, name), "messages", "eval")


def normalise_unpaired(dataset: Dataset | list[dict], name: str = "<dataset>") -> Dataset:
    """prompt/completion/label rows; pairs give one desirable and one undesirable row."""
    return normalise(dataset, "kto", name)


def _examples(dataset: Dataset | list[dict], name: str) -> list[dict]:
    rows = dataset.to_list() if isinstance(dataset, Dataset) else list(dataset)
    return [dict(ex, _source=name) for ex in parse_rows(rows, name)]


# ---------------------------------------------------------------------------- reading sources

def describe(args: DatasetArgs) -> str:
    return f"{args.path}" + (f" ({args.name})" if args.name else "") + f" split {args.split}"


def load_examples(args: DatasetArgs) -> list[dict]:
    """One source read, columns selected, every row checked and normalised to its kind."""
    where = describe(args)
    rows, lines = read_rows(args)
    if not rows:
        raise DataError(f"dataset {where}: is empty (no rows)")
    if args.columns:
        missing = [c for c in args.columns if c not in rows[0]]
        if missing:
            raise DataError(f"dataset {where}: columns {missing} selected but not found; "
                            f"columns: {sorted(rows[0])}")
        rows = [{c: r.get(c) for c in args.columns} for r in rows]
    return parse_rows(rows, where, lines, split=args.split, max_invalid_fraction=args.max_invalid_fraction)


def parse_rows(rows: list[dict], where: str, lines: list[int] | None = None, split: str | None = None,
               max_invalid_fraction: float = 0.0) -> list[dict]:
    """Recognise the layout from the first row, then check and normalise every row."""
    if not rows:
        raise DataError(f"dataset {where}: is empty (no rows)")
    at = (lambda i: f"line {lines[i]}") if lines else (lambda i: f"row {i}")  # noqa: E731
    try:
        layout = formats.detect_format(set(rows[0]), rows[0])
    except RowError as e:
        at_row = f"{at(0)}: column {e.column!r}: " if e.column else ""
        raise DataError(f"dataset {where}: {at_row}{e.problem}; accepted layouts: "
                        + "; ".join(formats.LAYOUTS)) from None
    if layout == "halos" and split is not None:
        # HALOs files hold every split; a row without `split` belongs to all (as HALOs reads them).
        keep = [i for i, row in enumerate(rows) if row.get("split", split) == split]
        if not keep:
            raise DataError(f"dataset {where}: no row has split {split!r}; splits: "
                            f"{sorted({str(row.get('split')) for row in rows})}")
        rows, lines = [rows[i] for i in keep], [lines[i] for i in keep] if lines else None
        at = (lambda i: f"line {lines[i]}") if lines else (lambda i: f"row {keep[i]}")  # noqa: E731
    if layout == "oasst_tree":
        try:
            pairs = formats.parse_oasst_tree(rows)
        except RowError as e:
            raise DataError(f"dataset {where}: {at(e.row)}: column {e.column!r}: {e.problem}") from None
        if not pairs:
            raise DataError(f"dataset {where}: no prompter message has two ranked assistant replies, so "
                            f"there is no preference pair")
        return [pair for _, pair in pairs]
    parse = formats.ROW_PARSERS[layout]
    out: list[dict] = []
    invalid: list[str] = []
    for i, row in enumerate(rows):
        try:
            out += parse(row)
        except RowError as e:
            invalid.append(f"{at(i)}: column {e.column!r}: {e.problem}")
            if len(invalid) > max_invalid_fraction * len(rows):
                allowed = (f"; {len(invalid)} invalid rows so far exceed maxInvalidFraction "
                           f"{max_invalid_fraction}" if max_invalid_fraction else "")
                raise DataError(f"dataset {where}: {invalid[0]} (read as layout {layout!r}){allowed}") from None
    if invalid:
        log.warning("dataset %s: skipped %d of %d malformed rows (maxInvalidFraction %s); first: %s",
                    where, len(invalid), len(rows), max_invalid_fraction, invalid[0])
    return out


# Compressed files: the suffix after the format's says how (data.jsonl.gz, data.csv.zst, ...).
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a data file's name."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def open_text(path: Path, compression: str | None, newline: str | None = None):
    """A text stream of the file, decompressed; UTF-8 with or without a byte-order mark (utf-8-sig),
    CRLF or LF line endings alike."""
    if compression is None:
        return path.open(encoding="utf-8-sig", newline=newline)
    if compression == ".gz":
        import gzip
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    if compression == ".bz2":
        import bz2
        return bz2.open(path, "rt", encoding="utf-8-sig", newline=newline)
    if compression == ".xz":
        import lzma
        return lzma.open(path, "rt", encoding="utf-8-sig", newline=newline)
    import io

    import zstandard  # the trainer extra has it
    return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True),
                            encoding="utf-8-sig", newline=newline)


def read_rows(args: DatasetArgs) -> tuple[list[dict], list[int] | None]:
    """Plain rows and, for JSON Lines and CSV, the 1-based line number of each."""
    path = Path(args.path)
    if path.is_file():
        where = describe(args)
        fmt, compression = file_format(path)
        if fmt == ".parquet" and compression is None:
            return read_table(path, where), None
        if fmt not in (".jsonl", ".json", ".csv"):
            raise DataError(f"dataset {where}: unknown file type {''.join(path.suffixes[-2:])!r}; accepted: "
                            f".jsonl, .json, .csv (each also compressed: {', '.join(COMPRESSIONS)}), .parquet")
        try:
            if fmt == ".jsonl":
                return read_jsonl(path, where, compression)
            if fmt == ".json":
                return read_json(path, where, compression)
            return read_csv(path, where, compression)
        except UnicodeDecodeError as e:
            raise DataError(f"dataset {where}: not UTF-8 text (byte {e.start} of the decoded stream: "
                            f"{e.reason}); save it as UTF-8") from None
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - gzip/bz2/lzma/zstd each raise their own: say which file
            what = f"decompress ({compression})" if compression else "read"
            raise DataError(f"dataset {where}: cannot {what}: {type(e).__name__}: {e}") from None
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        return load_hf(args, lambda: datasets.load_from_disk(str(path))), None
    # A directory of data files, or a Hub id.
    return load_hf(args, lambda: datasets.load_dataset(args.path, args.name, split=args.split)), None


def load_hf(args: DatasetArgs, load) -> list[dict]:
    try:
        ds = load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever datasets raises, say which dataset it was
        raise DataError(f"dataset {describe(args)}: cannot load: {type(e).__name__}: {e}") from e
    if isinstance(ds, DatasetDict):
        if args.split not in ds:
            raise DataError(f"dataset {describe(args)}: no split {args.split!r}; splits: {sorted(ds)}")
        ds = ds[args.split]
    return ds.to_list()


def read_table(path: Path, where: str) -> list[dict]:
    """Parquet through pyarrow (its own types; no `datasets` cache written)."""
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are many; say which file
        raise DataError(f"dataset {where}: cannot read {path.suffix} file: {type(e).__name__}: {e}") from e
    return table.to_pylist()


def read_csv(path: Path, where: str, compression: str | None = None) -> tuple[list[dict], list[int]]:
    """CSV with a header row; every value is text, as written (an answer "42" or "1e3" stays a
    string; labels "true"/"1" are read as labels later). Lines are where each record ends."""
    import csv

    rows, lines = [], []
    with open_text(path, compression, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"dataset {where}: is empty (no header row)")
        for row in reader:
            extra = row.pop(None, None)
            if extra:
                raise DataError(f"dataset {where}: line {reader.line_num}: {len(extra)} more values than the "
                                f"header's {len(reader.fieldnames)} columns (quote values holding commas)")
            rows.append(row)
            lines.append(reader.line_num)
    return rows, lines


def read_jsonl(path: Path, where: str, compression: str | None = None) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    with open_text(path, compression) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows.append(_json_object(line, where, f"line {n}"))
            lines.append(n)
    return rows, lines


def read_json(path: Path, where: str, compression: str | None = None) -> tuple[list[dict], list[int] | None]:
    """A JSON array of objects (one object: one row), or JSON Lines named .json (as to_json writes)."""
    with open_text(path, compression) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path, where, compression)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"dataset {where}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"dataset {where}: row {i}: expected a JSON object, got {type(row).__name__}")
    return data, None


def _json_object(text: str, where: str, at: str) -> dict[str, Any]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"dataset {where}: {at}: malformed JSON ({e.msg} at column {e.colno}); "
                        f"each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f"dataset {where}: {at}: expected a JSON object, got {type(row).__name__}")
    return row
