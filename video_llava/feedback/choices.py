"""Multiple-choice answers read back as option letters, as lmms-eval's tasks read them, and benchmark accuracy per
category with 95% intervals.

The letter rule (Video-MME's ``extract_characters_regex`` and MMMU's ``parse_multi_choice_response``): drop the
phrases models lead with ("The best answer is"), then take a bracketed letter "(B)", else a letter standing alone
("B", "B.", "B) ..."), else the option whose text the answer says (an answer that is exactly an option's text, or
one of over five words that contains it); where several match, the last said counts (MMMU's). No letter is wrong,
not a random pick (MMMU picks at random; a score should not move between runs).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from video_llava.data.benchmarks import LETTERS
from video_llava.feedback.intervals import wilson

LEADS = ("the best answer is", "the correct answer is", "the answer is", "the best option is",
         "the correct option is", "best answer:", "best option:", "answer:", "option:", "the answer")


def extract_letter(response: str, options: Sequence[str]) -> str:
    """The option letter ``response`` picks among ``options``, or ``""``."""
    letters = LETTERS[:len(options)]
    text = response.strip()
    for lead in LEADS:
        text = re.sub(re.escape(lead), " ", text, flags=re.IGNORECASE)
    found = [(m.start(), m.group(1)) for m in re.finditer(rf"\(([{letters}])\)", text)]
    if not found:
        padded = " " + re.sub(r"[,.!?;:'\"()\[\]]", " ", text) + " "
        found = [(m.start(), m.group(1)) for m in re.finditer(rf"(?<= )([{letters}])(?= )", padded)]
    if not found:
        said = text.lower().strip(" .!")
        exact = [letters[k] for k, option in enumerate(options) if option.lower().strip(" .") == said]
        if exact:
            return exact[0]
        if len(text.split()) > 5:
            found = [(said.rfind(option.lower()), letters[k]) for k, option in enumerate(options)
                     if option.strip() and option.lower() in said]
    return max(found)[1] if found else ""


def choice_figures(rows: list[dict]) -> dict:
    """Accuracy per category and overall (``all``) with Wilson's 95% interval; ``unparsed`` counts answers that
    named no letter (wrong), ``errors`` rows that got no answer (wrong too: the published figures count every item)."""
    from video_llava.data.benchmarks import BenchmarkItem

    groups: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)
    for row in rows:
        item = BenchmarkItem.from_row(row)
        said = "" if row["error"] or not row["candidates"] else extract_letter(row["candidates"][0], item.options)
        outcome = (said == item.answer, not said and not row["error"], bool(row["error"]))
        groups["all"].append(outcome)
        groups[item.category].append(outcome)
    return {name: {"n": len(group), "accuracy": round(sum(r for r, _, _ in group) / len(group), 4),
                   "accuracy_interval": wilson(sum(r for r, _, _ in group), len(group)),
                   "unparsed": sum(u for _, u, _ in group), "errors": sum(e for _, _, e in group)}
            for name, group in sorted(groups.items())}
