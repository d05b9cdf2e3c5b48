"""Dataset layouts, recognised by their columns, each read row by row into one of three kinds.

    conversation  {"messages": [msg, ...]}                                  chats (SFT)
    pair          {"prompt": [msg, ...], "chosen": [msg], "rejected": [msg]} pairwise preference
    unpaired      {"prompt": [msg, ...], "completion": [msg], "label": bool} binary feedback (KTO)

A msg is {"role": "system" | "user" | "assistant", "content": str} (OpenAI-style content parts:
the text parts joined; other parts refused). Prompts alternate user and
assistant turns (a system turn may come first) and end with a user turn; replies are one
assistant message. Every parser checks this and raises RowError naming the column; data.py
adds the dataset and the row or file line.

Pure Python over plain dicts (no datasets, no torch): linear in the rows, cheap enough to check
every row before training starts.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

LAYOUTS = (
    "messages (chat turns; 'conversations' with from/value as ShareGPT writes it)",
    "prompt/chosen/rejected (prompt as text or turns; or chosen/rejected as whole conversations "
    "sharing their prompt, as in UltraFeedback binarized; or Anthropic HH-RLHF transcripts)",
    "prompt/completion/label (unpaired binary feedback, KTO); prompt/completion (SFT)",
    "messages/label (a conversation whose last reply is labelled)",
    "Stanford SHP (history, human_ref_A, human_ref_B, labels)",
    "OpenAssistant oasst1 message trees (message_id, parent_id, text, role, rank)",
    "HALOs feedback JSON (type binary_feedback: prompt, output, label; "
    "type pairwise_feedback: prompt, output_A, output_B, label)",
)

ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
         "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class RowError(ValueError):
    """A problem with one row: which column, what is wrong (and the row, when the parser knows it)."""

    def __init__(self, column: str | None, problem: str, row: int | None = None):
        super().__init__(problem)
        self.column, self.problem, self.row = column, problem, row


# ---------------------------------------------------------------------------- detection

def detect_format(columns: set[str], first: dict[str, Any]) -> str:
    """The layout of a dataset from its column names (and the shape of its first row)."""
    if {"message_id", "parent_id", "text", "role"} <= columns:
        return "oasst_tree"
    if {"history", "human_ref_A", "human_ref_B"} <= columns:
        return "shp"
    if first.get("type") in HALOS_TYPES or {"output_A", "output_B"} <= columns:
        return "halos"
    if "chosen" in columns or "rejected" in columns:
        missing = sorted({"chosen", "rejected"} - columns)
        if missing:
            raise RowError(missing[0], f"column {missing[0]!r} is missing (a preference dataset needs "
                                       f"both 'chosen' and 'rejected')")
        if "prompt" not in columns and is_hh_transcript(first.get("chosen")):
            return "hh_rlhf"
        return "preference"
    if {"prompt", "output", "label"} <= columns:
        return "halos"
    if {"prompt", "completion"} <= columns:
        return "unpaired" if "label" in columns else "prompt_completion"
    if "messages" in columns or "conversations" in columns:
        return "messages_unpaired" if "label" in columns else "messages"
    raise RowError(None, f"no known layout for columns {sorted(columns)}")


def is_hh_transcript(value: Any) -> bool:
    """Anthropic HH-RLHF: a string '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    return isinstance(value, str) and value.lstrip(" ").startswith("\n\nHuman:")


# ---------------------------------------------------------------------------- messages

def message(value: Any, column: str, role: str | None = None) -> dict[str, str]:
    """One message from {role, content}, ShareGPT {from, value}, or OASST-style {role, text}."""
    if isinstance(value, str) and role is not None:
        raw_role, content = role, value
    elif isinstance(value, dict):
        raw_role = value["role"] if "role" in value else value.get("from")
        content = value["content"] if "content" in value else value.get("value", value.get("text"))
    else:
        raise RowError(column, f"expected a message {{'role', 'content'}}, got {type(value).__name__}")
    canonical = ROLES.get(raw_role) or (ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None)
    if canonical is None:
        raise RowError(column, f"unknown role {raw_role!r}; accepted: {', '.join(ROLES)}")
    if isinstance(content, list):
        content = text_parts(content, column)
    if not isinstance(content, str):
        raise RowError(column, f"content must be a string, got {type(content).__name__}")
    if not content or content.isspace():
        raise RowError(column, "content is empty")
    return {"role": canonical, "content": content}


def text_parts(parts: list, column: str) -> str:
    """OpenAI-style content parts [{"type": "text", "text": ...}, ...]: the text parts joined with
    newlines (as vLLM's chat API joins them); any other part (an image, audio) is refused."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowError(column, f"content part {j} is {kind!r}: only text parts ({{'type': 'text', "
                                   f"'text': ...}}) can be trained on; drop the other parts")
        texts.append(part["text"])
    return "\n".join(texts)


def json_text_of_messages(value: str) -> str | None:
    """What a string holds when it is JSON-encoded messages (e.g. a CSV cell, or json.dumps saved
    into a column), else None."""
    text = value.strip()
    if not text.startswith(("[", "{")):
        return None
    try:
        decoded = json.loads(text)
    except ValueError:
        return None
    items = decoded if isinstance(decoded, list) else [decoded]
    if items and all(isinstance(m, dict) and ({"role", "content"} <= m.keys() or {"from", "value"} <= m.keys())
                     for m in items):
        return f"a list of {len(items)} messages" if isinstance(decoded, list) else "one message"
    return None


def messages(value: Any, column: str, role: str) -> list[dict[str, str]]:
    """A list of messages from a list, one message dict, or a plain string (given `role`)."""
    if isinstance(value, str):
        held = json_text_of_messages(value)
        if held:
            raise RowError(column, f"holds a JSON string that encodes {held}, not the messages themselves: "
                                   "store the list (JSON Lines, Parquet or a datasets directory keep it), or "
                                   "json.loads the column before saving")
        return [message(value, column, role)]
    if isinstance(value, dict):
        return [message(value, column)]
    if isinstance(value, (list, tuple)):
        if not value:
            raise RowError(column, "is an empty list of messages")
        return [message(m, column) for m in value]
    raise RowError(column, f"expected text or a list of messages, got {type(value).__name__}")


def check_turns(msgs: list[dict[str, str]], column: str, last: str) -> None:
    """System only first; then user, assistant, user, ... ending with `last`."""
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            at = i + len(msgs) - len(turns)
            raise RowError(column, f"roles must alternate user/assistant (system only first): message {at} "
                                   f"is {m['role']!r} where {expected!r} was expected")
    if not turns or turns[-1]["role"] != last:
        raise RowError(column, f"must end with a {last} turn")


def reply(value: Any, column: str) -> list[dict[str, str]]:
    """One assistant message: a string, a message, or a list holding exactly one."""
    msgs = messages(value, column, "assistant")
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError(column, f"expected one assistant message, got roles {[m['role'] for m in msgs]}")
    return msgs


def prompt(value: Any, column: str = "prompt") -> list[dict[str, str]]:
    msgs = messages(value, column, "user")
    check_turns(msgs, column, last="user")
    return msgs


def conversation(value: Any, column: str) -> list[dict[str, str]]:
    msgs = messages(value, column, "user")
    check_turns(msgs, column, last="assistant")
    return msgs


def label(value: Any, column: str = "label") -> bool:
    """True/False, 1/0, or 'true'/'false'."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(column, f"expected a boolean label (true/false or 1/0), got {value!r}")


def field(row: dict[str, Any], column: str) -> Any:
    if column not in row or row[column] is None:
        raise RowError(column, f"column {column!r} is missing")
    return row[column]


# ---------------------------------------------------------------------------- row parsers

def parse_messages(row: dict) -> list[dict]:
    column = "messages" if "messages" in row else "conversations"
    return [{"messages": conversation(field(row, column), column)}]


def parse_messages_unpaired(row: dict) -> list[dict]:
    column = "messages" if "messages" in row else "conversations"
    msgs = conversation(field(row, column), column)
    return [{"prompt": msgs[:-1], "completion": msgs[-1:], "label": label(field(row, "label"))}]


def parse_preference(row: dict) -> list[dict]:
    """Explicit prompt, or the prompt implicit in whole conversations (UltraFeedback binarized)."""
    chosen, rejected = field(row, "chosen"), field(row, "rejected")
    if _is_whole_conversation(chosen) or _is_whole_conversation(rejected):
        return [implicit_pair(conversation(chosen, "chosen"), conversation(rejected, "rejected"))]
    p = field(row, "prompt")
    p = hh_transcript(p, "prompt", last="user") if is_hh_transcript(p) else prompt(p)   # Dahoas/full-hh-rlhf
    return [{"prompt": p, "chosen": reply(chosen, "chosen"), "rejected": reply(rejected, "rejected")}]


def _is_whole_conversation(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 1 and isinstance(value[0], dict)
            and ROLES.get(str(value[0].get("role", value[0].get("from"))).lower()) in ("user", "system"))


def implicit_pair(chosen: list[dict], rejected: list[dict]) -> dict:
    """chosen and rejected are whole conversations; everything but their last reply is the prompt."""
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "chosen and rejected conversations must share every turn but their last "
                                   "(the prompt)")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def hh_transcript(text: Any, column: str, last: str = "assistant") -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [user hi, assistant hello].

    last="user": a prompt, whose trailing '\\n\\nAssistant:' (the empty reply to come) is dropped.
    """
    if not isinstance(text, str) or not is_hh_transcript(text):
        raise RowError(column, "expected an HH-RLHF transcript starting with '\\n\\nHuman: '")
    text = text.strip(" ")
    if last == "user":
        text = re.sub(r"\n\nAssistant:\s*$", "", text)
    parts = HH_TURN.split(text)
    msgs = [message(content.strip(), column, "user" if speaker == "Human" else "assistant")
            for speaker, content in zip(parts[1::2], parts[2::2])]
    check_turns(msgs, column, last=last)
    return msgs


def parse_hh_rlhf(row: dict) -> list[dict]:
    return [implicit_pair(hh_transcript(field(row, "chosen"), "chosen"),
                          hh_transcript(field(row, "rejected"), "rejected"))]


SHP_MIN_SCORE_RATIO = 2.0


def parse_shp(row: dict) -> list[dict]:
    """Stanford SHP: labels 1 means human_ref_A is preferred.

    As the DPO paper's code reads SHP, a pair counts only when one reply's score is at least
    twice the other's (score_A/score_B, when the row has them): closer votes are noise. Such a
    row gives no pair (it is not malformed).
    """
    scores = [row.get("score_A"), row.get("score_B")]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        low, high = sorted(scores)
        if not (high > 0 and (low <= 0 or high / low >= SHP_MIN_SCORE_RATIO)):
            return []
    a, b = reply(field(row, "human_ref_A"), "human_ref_A"), reply(field(row, "human_ref_B"), "human_ref_B")
    a_wins = label(field(row, "labels"), "labels")
    return [{"prompt": prompt(field(row, "history"), "history"),
             "chosen": a if a_wins else b, "rejected": b if a_wins else a}]


def parse_unpaired(row: dict, completion: str = "completion") -> list[dict]:
    """prompt/completion/label; `completion` names the reply column (HALOs calls it output)."""
    return [{"prompt": prompt(field(row, "prompt")), "completion": reply(field(row, completion), completion),
             "label": label(field(row, "label"))}]


def parse_prompt_completion(row: dict) -> list[dict]:
    """prompt/completion without a label: supervised data, every completion desirable."""
    return [{"prompt": prompt(field(row, "prompt")), "completion": reply(field(row, "completion"), "completion"),
             "label": True}]


HALOS_TYPES = ("binary_feedback", "pairwise_feedback")


def parse_halos(row: dict) -> list[dict]:
    """HALOs feedback JSON (what its label.py writes), told apart by `type`.

    binary_feedback: prompt, output, label (1 desirable, 0 not); pairwise_feedback: prompt,
    output_A, output_B, label (1 means output_A is preferred). Outputs are lists of turns;
    rewards, ids and `split` are extra (data.py keeps the rows of the requested split).
    """
    kind = row.get("type") or ("pairwise_feedback" if "output_A" in row else "binary_feedback")
    if kind == "binary_feedback":
        return parse_unpaired(row, completion="output")
    if kind != "pairwise_feedback":
        raise RowError("type", f"unknown feedback type {kind!r}; accepted: {', '.join(HALOS_TYPES)}")
    a, b = reply(field(row, "output_A"), "output_A"), reply(field(row, "output_B"), "output_B")
    a_wins = label(field(row, "label"))
    return [{"prompt": prompt(field(row, "prompt")), "chosen": a if a_wins else b, "rejected": b if a_wins else a}]


ROW_PARSERS = {
    "messages": parse_messages, "messages_unpaired": parse_messages_unpaired,
    "preference": parse_preference, "hh_rlhf": parse_hh_rlhf, "shp": parse_shp,
    "unpaired": parse_unpaired, "prompt_completion": parse_prompt_completion,
    "halos": parse_halos,
}


# ---------------------------------------------------------------------------- OASST message trees

def parse_oasst_tree(rows: list[dict]) -> list[tuple[int, dict]]:
    """oasst1 rows (one message each) -> pairs of sibling assistant replies, best rank chosen.

    For every prompter message with two or more ranked assistant replies, the best-ranked reply
    (rank 0) is paired against each other ranked one; the prompt is the path from the tree's
    root. Deleted messages are skipped. Returns (row index of the rejected reply, pair).
    """
    by_id: dict[str, int] = {}
    children: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get("deleted"):
            continue
        for column in ("message_id", "text", "role"):
            if not isinstance(row.get(column), str):
                raise RowError(column, f"column {column!r} is missing or not a string", row=i)
        by_id[row["message_id"]] = i
        if row.get("parent_id") is not None:
            children[row["parent_id"]].append(i)

    def path(i: int) -> list[dict[str, str]]:
        turns = []
        while i is not None:
            row = rows[i]
            turns.append(_oasst_message(row, i))
            parent = row.get("parent_id")
            if parent is not None and parent not in by_id:
                raise RowError("parent_id", f"parent {parent!r} is not in the dataset (or deleted)", row=i)
            i = by_id[parent] if parent is not None else None
            if len(turns) > len(rows):
                raise RowError("parent_id", "message tree has a cycle", row=i)
        return turns[::-1]

    out = []
    for parent_id, kids in children.items():
        if parent_id not in by_id or rows[by_id[parent_id]]["role"] != "prompter":
            continue
        ranked = sorted((rows[k]["rank"], k) for k in kids
                        if rows[k]["role"] == "assistant" and rows[k].get("rank") is not None)
        if len(ranked) < 2:
            continue
        p = path(by_id[parent_id])
        try:
            check_turns(p, "role", last="user")
        except RowError as e:
            raise RowError(e.column, e.problem, row=by_id[parent_id]) from None
        (_, best), worse = ranked[0], ranked[1:]
        for _, k in worse:
            out.append((k, {"prompt": p, "chosen": [_oasst_message(rows[best], best)],
                            "rejected": [_oasst_message(rows[k], k)]}))
    return out


def _oasst_message(row: dict, i: int) -> dict[str, str]:
    try:
        return message({"role": row["role"], "content": row["text"]}, "text")
    except RowError as e:
        raise RowError(e.column, e.problem, row=i) from None
