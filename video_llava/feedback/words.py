"""The words of an answer, a reference or a caption in any script, for matching them against each other: letters
and digits of any alphabet in runs (case-folded, NFKC-normalised), and each character on its own in the scripts
written without spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar), so "红色" is 红 and 色 and a Chinese
answer is matched character by character (as character-level metrics score Chinese), not dropped as no words."""

from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces between words: one character, one token.
_UNSPACED = ("\u3040-\u30ff"  # hiragana, katakana
             "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (extension A, unified, compatibility)
             "\U00020000-\U0002fa1f"  # CJK extensions B-F, compatibility supplement
             "\u0e00-\u0eff"  # Thai, Lao
             "\u1000-\u109f\u1780-\u17ff")  # Myanmar, Khmer
_TOKEN = re.compile(f"[{_UNSPACED}]|(?:(?![{_UNSPACED}])[^\\W_])+")


def words(text: str) -> list[str]:
    """``text``'s words in order: runs of letters and digits, one character each in unspaced scripts."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())
