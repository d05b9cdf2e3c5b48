"""The judges' prompts and how their answers are read: MT-Bench's (Zheng et al. 2023, FastChat's
llm_judge/data/judge_prompts.jsonl), text only, no I/O.

    SYSTEM, USER       the pairwise prompt (judge.Judge.verdict, the eval stage's judge metric):
                       [[A]], [[B]] or [[C]] (parse_verdict)
    SINGLE, ...MATH    single-answer grading 1-10, first turn and multi-turn, with and without a
                       reference answer (mt_bench.py; grpo's and label's judge reward use SINGLE):
                       [[N]] (parse_rating)
"""

from __future__ import annotations

import re

# MT-Bench's pairwise judge prompt (Zheng et al. 2023), shortened.
SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Choose the assistant that follows the user's "
    "instructions and answers the user's question better, considering helpfulness, relevance, accuracy, "
    "depth and level of detail. Avoid any position bias: the order in which the responses were presented "
    "must not influence your decision, nor their length, nor the assistants' names. Be as objective as "
    "possible. After a short explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]"
        "\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"\b(A|B|tie)\b\W*$", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge's answer; None when it gives no verdict."""
    found = _VERDICT.findall(text) or _BARE.findall(text.strip())
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("C", "TIE") else v


_RATE = ("After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
         'this format: "[[rating]]", for example: "Rating: [[5]]".')
# FastChat's llm_judge/data/judge_prompts.jsonl: single-v1, single-math-v1 and their multi-turn forms.
SINGLE = ("You are a helpful assistant.",
          "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
          "assistant to the user question displayed below. Your evaluation should consider factors such as the "
          "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
          "evaluation by providing a short explanation. Be as objective as possible. " + _RATE +
          "\n\n[Question]\n{question_1}\n\n[The Start of Assistant's Answer]\n{answer_1}\n[The End of Assistant's Answer]")
SINGLE_MATH = ("You are a helpful assistant.",
               "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an "
               "AI assistant to the user question displayed below. Your evaluation should consider correctness and "
               "helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by "
               "comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
               "objective as possible. " + _RATE + "\n\n[Question]\n{question_1}\n\n[The Start of Reference Answer]\n"
               "{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer_1}\n"
               "[The End of Assistant's Answer]")
_CONVERSATION = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
                 "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
                 "<|The End of Assistant A's Conversation with User|>")
MULTI = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
         "user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, "
         "accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the "
         "assistant's answer to the second user question. Begin your evaluation by providing a short explanation. Be "
         "as objective as possible. " + _RATE + "\n\n", _CONVERSATION)
MULTI_MATH = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
              "the user question. Your evaluation should consider correctness and helpfulness. You will be given a "
              "reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to "
              "the second question. Begin your evaluation by comparing the assistant's answer with the reference "
              "answer. Identify and correct any mistakes. Be as objective as possible. " + _RATE + "\n\n",
              "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}"
              "\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>"
              "\n\n\n" + _CONVERSATION)
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str) -> float | None:
    """FastChat's parse: the first [[N]], else the first [N]; None when absent or outside 1-10."""
    found = _RATING.search(text) or _RATING_BACKUP.search(text)
    if not found:
        return None
    value = float(found.group(1))
    return value if 1 <= value <= 10 else None
