"""Which speakers of a dialogue file may be one person under another name: what `data build`'s "did you mean"
lines and its unknown-`--character` message offer, strongest first.

Scripts and novels name a character many ways: a title with the name (`Lady Hua`, `华妃娘娘`), the name alone
(`Hua`, `华妃`), a pet name sharing a character (`嬛嬛` for `甄嬛`), a label with the name in brackets
(`莞嫔（甄嬛）`), another case or spacing (`THOMAS`), a typo (`Elenor`). Each kind is a tier; within a tier the
speaker with more lines comes first, as in the speakers table. A title with nothing of the name in it (`莞嫔` for
`甄嬛`) shares no letter with it, so no rule can find it: the speakers table shows it, and `--alias` folds it in.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_SEPARATORS = re.compile(r"[\s·•._\-]+")
SAME, CONTAINED, SHARED, SPELLED = range(4)  # tiers, strongest first


def _words(name: str) -> list[str]:
    return [w for w in _SEPARATORS.split(name.casefold()) if w]


def kinship(name: str, other: str) -> int | None:
    """The tier at which `other` may be `name` under another name (None: nothing suggests it)."""
    a, b = "".join(_words(name)), "".join(_words(other))
    if not a or not b or name == other:
        return None
    if a == b:
        return SAME  # another case or spacing
    if CJK.search(name) and CJK.search(other):
        if a in b or b in a:
            return CONTAINED  # 华妃 / 华妃娘娘, 甄嬛 / 莞嫔（甄嬛）
        if set(a) & set(b) and abs(len(a) - len(b)) <= 1:
            return SHARED  # 甄嬛 / 嬛嬛: a short name sharing a character
    else:
        wa, wb = set(_words(name)), set(_words(other))
        if wa <= wb or wb <= wa:
            return CONTAINED  # Hua / Lady Hua: every word of one is a word of the other
        last_a, last_b = _words(name)[-1], _words(other)[-1]
        if last_a == last_b and len(last_a) >= 3:
            return SHARED  # Lady Hua / Consort Hua: another title before one name
    if difflib.SequenceMatcher(None, a, b).ratio() >= 0.75:
        return SPELLED  # Elenor / Eleanor
    return None


def near_names(name: str, speakers: Counter) -> list[str]:
    """Speakers that may be `name` under another name, strongest kinship first, then by lines."""
    tiers = {other: kinship(name, other) for other in speakers}
    found = [other for other, tier in tiers.items() if tier is not None]
    return sorted(found, key=lambda s: (tiers[s], -speakers[s]))


def closest_speakers(name: str, speakers: Counter, limit: int = 5) -> list[str]:
    """For an unknown `--character`: the near names, then whatever difflib finds loosely similar, then (when
    nothing is) the speakers with the most lines."""
    out = near_names(name, speakers)
    out += [s for s in difflib.get_close_matches(name, list(speakers), n=limit, cutoff=0.3) if s not in out]
    return out[:limit] or [s for s, _ in speakers.most_common(limit)]


def spelling_variants(speakers: Counter) -> list[tuple[str, str]]:
    """Speakers that differ only in case or spacing (`Thomas`, `THOMAS`): (the rarer spelling, the commoner)."""
    groups: dict[str, list[str]] = {}
    for name in speakers:
        groups.setdefault("".join(name.split()).casefold(), []).append(name)
    out = []
    for names in groups.values():
        names.sort(key=lambda n: -speakers[n])
        out += [(other, names[0]) for other in names[1:]]
    return out
