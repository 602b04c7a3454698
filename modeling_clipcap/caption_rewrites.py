"""Rule-based rewrites of English captions that keep the words and break (or mirror) who is where.

Two uses:

* **Hard negatives** for contrastive tower pretraining (NegCLIP, Yuksekgonul et al., ICLR 2023): a caption whose
  words are (almost) the caption's own but whose binding is wrong. A tower that reads captions as bags of words
  cannot tell them from the true caption, so they teach it word order and binding.
  :func:`hard_negatives` returns, per kind:

  - ``swap_attributes``: the attribute words of two noun phrases trade places
    ("a small red circle left of a large blue square" -> "a large blue circle left of a small red square");
  - ``swap_objects``: the subject and the object of a spatial relation trade places
    ("a red circle left of a blue square" -> "a blue square left of a red circle");
  - ``swap_relation``: the relation is inverted ("left of" -> "right of", "above" -> "below");
  - ``change_attribute``: one attribute word is replaced by another of its kind (a colour by another colour, a
    size by its opposite). Unlike the other three this one also changes the bag of words.

* **Mirroring** for relation-aware augmentation: :func:`mirror_caption` rewrites a caption for the horizontally
  (left <-> right) or vertically (above <-> below) flipped image, or refuses (returns ``None``) when it cannot do
  that safely.

What it can rewrite: noun phrases of the form determiner + attribute words + noun ("a small red circle",
"the wooden table"), where attribute words come from a closed lexicon (:data:`ATTRIBUTE_WORDS`: colours, sizes,
materials, patterns, a few states); one spatial relation between two such phrases, from :data:`RELATIONS`
("left of", "to the right of", "above", "below", "over", "under", "in front of", "behind", ...). What it cannot:
attributes outside the lexicon or after the noun ("a circle that is red"), relations it does not list, plural or
determiner-less phrases ("red circles"), clauses ("the man who holds the dog"), text in the image. It then returns
``None`` (or an empty list) rather than a wrong rewrite: callers skip such captions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: attribute words, by kind (``change_attribute`` replaces a word by another of its kind)
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "color": (
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
        "gray",
        "grey",
        "silver",
        "gold",
        "golden",
        "beige",
        "teal",
        "navy",
        "maroon",
        "violet",
        "cyan",
        "magenta",
        "turquoise",
    ),
    "size": ("small", "large", "big", "little", "tiny", "huge", "giant", "tall", "short", "long"),
    "material": ("wooden", "metal", "metallic", "plastic", "glass", "stone", "brick", "leather", "paper"),
    "pattern": ("striped", "spotted", "checkered", "plaid", "dotted", "floral"),
    "state": ("old", "young", "new", "empty", "full", "open", "closed", "wet", "dry"),
}
#: the replacement ``change_attribute`` uses for a size word (its opposite); other kinds draw another word
OPPOSITE_SIZE: dict[str, str] = {
    "small": "large",
    "large": "small",
    "big": "small",
    "little": "big",
    "tiny": "huge",
    "huge": "tiny",
    "giant": "tiny",
    "tall": "short",
    "short": "tall",
    "long": "short",
}
_KIND_OF = {word: kind for kind, words in ATTRIBUTE_WORDS.items() for word in words}
DETERMINERS = frozenset(
    {"a", "an", "the", "one", "this", "that", "another", "some", "his", "her", "its", "their", "my", "our"}
)
#: nouns that frame the caption rather than name an object ("a picture of ...")
FRAME_NOUNS = frozenset(
    {
        "picture",
        "photo",
        "photograph",
        "image",
        "view",
        "drawing",
        "painting",
        "illustration",
        "shot",
        "scene",
    }
)
#: words that are never the noun of a phrase (a determiner followed by one of these is not parsed)
_NOT_NOUNS = frozenset(
    {"of", "and", "or", "is", "are", "with", "in", "on", "to", "at", "by", "that", "which"}
)
#: words that may follow a phrase's noun (anything else, e.g. the second word of "a stop sign", and the phrase
#: is not parsed: the rewrites then refuse rather than split a compound noun)
_AFTER_NOUN = frozenset(
    {"of", "in", "on", "at", "with", "by", "near", "beside", "behind", "under", "over", "above", "below"}
    | {"to", "from", "into", "onto", "next", "and", "or", "but", "that", "which", "who", "while", "is", "are"}
    | {"was", "were", "has", "have", "left", "right", "underneath", "beneath", "for", "as", "there", "here"}
)


@dataclass(frozen=True)
class Relation:
    """A spatial relation phrase, its inverse, the axis a flip of which mirrors it, and whether it is symmetric."""

    words: tuple[str, ...]
    inverse: tuple[str, ...] | None
    axis: str | None  # "horizontal", "vertical", or None (depth: no flip mirrors it)


def _rel(phrase: str, inverse: str | None, axis: str | None) -> Relation:
    return Relation(tuple(phrase.split()), tuple(inverse.split()) if inverse else None, axis)


#: relations, longest first (the first that matches at a position wins)
RELATIONS: tuple[Relation, ...] = (
    _rel("to the left of", "to the right of", "horizontal"),
    _rel("to the right of", "to the left of", "horizontal"),
    _rel("on the left of", "on the right of", "horizontal"),
    _rel("on the right of", "on the left of", "horizontal"),
    _rel("in front of", "behind", None),
    _rel("on top of", "beneath", "vertical"),
    _rel("left of", "right of", "horizontal"),
    _rel("right of", "left of", "horizontal"),
    _rel("next to", None, None),
    _rel("above", "below", "vertical"),
    _rel("below", "above", "vertical"),
    _rel("over", "under", "vertical"),
    _rel("under", "over", "vertical"),
    _rel("underneath", "above", "vertical"),
    _rel("beneath", "above", "vertical"),
    _rel("behind", "in front of", None),
    _rel("beside", None, None),
    _rel("near", None, None),
)

#: words mirrored by a flip of each axis (both directions are listed)
MIRROR_WORDS: dict[str, dict[str, str]] = {
    "horizontal": {
        "left": "right",
        "right": "left",
        "leftmost": "rightmost",
        "rightmost": "leftmost",
        "left-hand": "right-hand",
        "right-hand": "left-hand",
    },
    "vertical": {
        "above": "below",
        "below": "above",
        "over": "under",
        "under": "over",
        "top": "bottom",
        "bottom": "top",
        "upper": "lower",
        "lower": "upper",
        "beneath": "above",
        "underneath": "above",
    },
}
#: a caption with one of these words is never mirrored: text reads backwards in a flipped image, and a vertical
#: flip contradicts gravity ("on", "sitting", "sky" ...)
_NO_MIRROR: dict[str, frozenset[str]] = {
    "horizontal": frozenset(
        {"sign", "text", "word", "words", "letter", "letters", "written", "writing", "reads", "says", "logo"}
        | {"number", "numbers", "clock", "east", "west", "clockwise", "counterclockwise", "hand", "hands"}
    ),
    "vertical": frozenset(
        {"sign", "text", "word", "words", "letter", "letters", "written", "writing", "reads", "says", "logo"}
        | {
            "on",
            "onto",
            "upon",
            "sitting",
            "standing",
            "hanging",
            "falling",
            "lying",
            "sky",
            "ground",
            "floor",
        }
        | {"ceiling", "upside", "up", "down", "climbing", "flying", "north", "south"}
    ),
}
#: the words that may follow / precede "left" or "right" when they mean a side (anything else: refuse)
_SIDE_AFTER = frozenset({"of", "side", "hand", "corner", "edge", "half", "end", "."})
_SIDE_BEFORE = frozenset({"the", "its", "their", "his", "her", "to", "on", "at", "far", "upper", "lower"})

_TOKEN = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*|\S")


@dataclass(frozen=True)
class _Token:
    text: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.text.lower()


@dataclass(frozen=True)
class _Phrase:
    """A noun phrase: token indices of its determiner, its attribute words and its noun."""

    det: int
    attributes: tuple[int, ...]
    noun: int

    @property
    def start(self) -> int:
        return self.det

    @property
    def end(self) -> int:  # one past the noun
        return self.noun + 1


def _tokens(caption: str) -> list[_Token]:
    return [_Token(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(caption)]


def _is_word(token: _Token) -> bool:
    return token.text[0].isalpha()


def _phrases(tokens: list[_Token]) -> list[_Phrase]:
    """Every determiner + attribute words + noun phrase, left to right."""
    out: list[_Phrase] = []
    i = 0
    while i < len(tokens):
        if tokens[i].lower in DETERMINERS:
            j = i + 1
            while j < len(tokens) and tokens[j].lower in _KIND_OF:
                j += 1
            if (
                j < len(tokens)
                and _is_word(tokens[j])
                and tokens[j].lower not in DETERMINERS
                and tokens[j].lower not in _NOT_NOUNS
                and not _relation_at(tokens, j)
                and _ends_phrase(tokens, j + 1)
            ):
                out.append(_Phrase(i, tuple(range(i + 1, j)), j))
                i = j + 1
                continue
        i += 1
    return out


def _ends_phrase(tokens: list[_Token], i: int) -> bool:
    """Whether token ``i`` may follow a noun: the end, punctuation, a preposition, conjunction or auxiliary, or a
    participle ("chasing", "parked")."""
    if i >= len(tokens) or not _is_word(tokens[i]):
        return True
    word = tokens[i].lower
    return word in _AFTER_NOUN or word.endswith(("ing", "ed")) or _relation_at(tokens, i) is not None


def _relation_at(tokens: list[_Token], i: int) -> Relation | None:
    for relation in RELATIONS:
        n = len(relation.words)
        if tuple(t.lower for t in tokens[i : i + n]) == relation.words:
            return relation
    return None


def _relations(tokens: list[_Token], phrases: list[_Phrase]) -> list[tuple[int, Relation]]:
    """Spatial relations outside noun phrases: (token index, relation), left to right."""
    inside = {k for p in phrases for k in range(p.start, p.end)}
    found: list[tuple[int, Relation]] = []
    i = 0
    while i < len(tokens):
        relation = None if i in inside else _relation_at(tokens, i)
        if relation is not None:
            found.append((i, relation))
            i += len(relation.words)
        else:
            i += 1
    return found


def _article(next_word: str, original: str) -> str:
    """'a' or 'an' for ``next_word``, in the case of ``original``."""
    word = "an" if next_word[:1].lower() in "aeiou" else "a"
    return word.capitalize() if original[:1].isupper() else word


def _render(caption: str, tokens: list[_Token], replacements: dict[int, str]) -> str:
    """``caption`` with token ``i``'s text replaced by ``replacements[i]`` (``""`` drops it and a space), then
    the indefinite articles fixed for the words that now follow them."""
    pieces: list[str] = []
    cursor = 0
    texts = [replacements.get(i, t.text) for i, t in enumerate(tokens)]
    for i, token in enumerate(tokens):
        if tokens[i].lower in ("a", "an") and i + 1 in replacements and i not in replacements:
            following = next((texts[k] for k in range(i + 1, len(tokens)) if texts[k]), "")
            if following and following[0].isalpha():
                texts[i] = _article(following, token.text)
    for i, token in enumerate(tokens):
        gap = caption[cursor : token.start]
        if texts[i] == "":
            pieces.append(gap if not pieces else "")
        else:
            pieces.append(gap + texts[i])
        cursor = token.end
    pieces.append(caption[cursor:])
    return re.sub(r"\s{2,}", " ", "".join(pieces)).strip()


def _span_text(caption: str, tokens: list[_Token], start: int, end: int) -> str:
    """The original text of tokens ``start .. end - 1`` (empty when ``start == end``)."""
    return caption[tokens[start].start : tokens[end - 1].end] if end > start else ""


def _moved(text: str, from_index: int, to_index: int) -> str:
    """A phrase's text moved from token ``from_index`` to ``to_index``: a capital that only marked the start of
    the caption goes, and the caption's new first word gets one if the old first word had it."""
    if from_index == 0 and to_index != 0 and text[:1].isupper():
        return text[:1].lower() + text[1:]
    return text


def _subject_and_object(
    tokens: list[_Token], phrases: list[_Phrase]
) -> tuple[_Phrase, int, Relation, _Phrase] | None:
    """The one relation's subject phrase (the first phrase that does not frame the caption), the relation and its
    object (the phrase right after it); ``None`` unless the caption has exactly one such relation."""
    relations = _relations(tokens, phrases)
    if len(relations) != 1:
        return None
    at, relation = relations[0]
    after = at + len(relation.words)
    objects = [p for p in phrases if p.start == after]
    subjects = [
        p
        for p in phrases
        if p.end <= at
        and not (tokens[p.noun].lower in FRAME_NOUNS and p.end < len(tokens) and tokens[p.end].lower == "of")
    ]
    if not objects or not subjects:
        return None
    return subjects[0], at, relation, objects[0]


def swap_attributes(caption: str) -> str | None:
    """The attribute words of the first two noun phrases that have some, swapped; ``None`` when there are fewer
    than two such phrases or the swap changes nothing ("a red circle left of a red square")."""
    tokens = _tokens(caption)
    described = [p for p in _phrases(tokens) if p.attributes]
    if len(described) < 2:
        return None
    first, second = described[0], described[1]
    text_a = _span_text(caption, tokens, first.attributes[0], first.attributes[-1] + 1)
    text_b = _span_text(caption, tokens, second.attributes[0], second.attributes[-1] + 1)
    if text_a.lower() == text_b.lower():
        return None
    replacements = {first.attributes[0]: text_b, second.attributes[0]: text_a}
    replacements.update({k: "" for k in first.attributes[1:] + second.attributes[1:]})
    return _render(caption, tokens, replacements)


def swap_objects(caption: str) -> str | None:
    """The subject and the object of the caption's one spatial relation swapped (determiner, attributes and noun
    move together); ``None`` without exactly one relation between two phrases, for a symmetric relation ("next
    to": the swap would mean the same), or when both phrases are the same."""
    tokens = _tokens(caption)
    found = _subject_and_object(tokens, _phrases(tokens))
    if found is None or found[2].inverse is None:
        return None
    subject, _, _, obj = found
    text_s = _span_text(caption, tokens, subject.start, subject.end)
    text_o = _span_text(caption, tokens, obj.start, obj.end)
    if text_s.lower() == text_o.lower():
        return None
    if subject.start == 0 and tokens[0].text[:1].isupper():
        text_o = text_o[:1].upper() + text_o[1:]
    replacements = {subject.start: text_o, obj.start: _moved(text_s, subject.start, obj.start)}
    replacements.update({k: "" for k in range(subject.start + 1, subject.end)})
    replacements.update({k: "" for k in range(obj.start + 1, obj.end)})
    return _render(caption, tokens, replacements)


def swap_relation(caption: str) -> str | None:
    """The caption's one spatial relation replaced by its inverse ("left of" -> "right of"); ``None`` without
    exactly one relation between two phrases, or for a symmetric one ("next to")."""
    tokens = _tokens(caption)
    found = _subject_and_object(tokens, _phrases(tokens))
    if found is None or found[2].inverse is None:
        return None
    _, at, relation, _ = found
    replacements = {at: " ".join(relation.inverse)}
    replacements.update({k: "" for k in range(at + 1, at + len(relation.words))})
    return _render(caption, tokens, replacements)


def change_attribute(
    caption: str, rng: random.Random | None = None, vocabulary: frozenset[str] | set[str] | None = None
) -> str | None:
    """One attribute word replaced by another of its kind (a size by its opposite); ``None`` without any.
    ``vocabulary``: when given, only words in it are drawn as replacements (e.g. a corpus's own colour words)."""
    rng = rng or random.Random(0)
    tokens = _tokens(caption)
    candidates = [k for p in _phrases(tokens) for k in p.attributes]
    if not candidates:
        return None
    k = rng.choice(candidates)
    word = tokens[k].lower
    kind = _KIND_OF[word]
    if kind == "size":
        new = OPPOSITE_SIZE[word]
    else:
        synonyms = {"gray": "grey", "grey": "gray", "gold": "golden", "golden": "gold"}
        choices = [w for w in ATTRIBUTE_WORDS[kind] if w not in (word, synonyms.get(word))]
        choices = [w for w in choices if vocabulary is None or w in vocabulary]
        if not choices:
            return None
        new = rng.choice(choices)
    if vocabulary is not None and new not in vocabulary:
        return None
    if tokens[k].text[:1].isupper():
        new = new.capitalize()
    return _render(caption, tokens, {k: new})


NEGATIVE_KINDS: tuple[str, ...] = ("swap_attributes", "swap_objects", "swap_relation", "change_attribute")
_REWRITES = {
    "swap_attributes": swap_attributes,
    "swap_objects": swap_objects,
    "swap_relation": swap_relation,
}


def check_negative_kinds(kinds: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``kinds`` as a tuple, or a ValueError naming the unknown ones and the valid choices."""
    unknown = [k for k in kinds if k not in NEGATIVE_KINDS]
    if unknown:
        raise ValueError(f"unknown hard negative kind(s) {unknown}; choose from {list(NEGATIVE_KINDS)}.")
    return tuple(kinds)


def hard_negatives(
    caption: str,
    kinds: tuple[str, ...] = NEGATIVE_KINDS,
    rng: random.Random | None = None,
    vocabulary: frozenset[str] | set[str] | None = None,
) -> list[str]:
    """One negative per kind in ``kinds`` that applies to ``caption`` (duplicates and the caption itself left
    out), in the order of ``kinds``; ``[]`` when none applies. ``vocabulary``: see :func:`change_attribute`."""
    out: list[str] = []
    for kind in check_negative_kinds(kinds):
        if kind == "change_attribute":
            rewritten = change_attribute(caption, rng, vocabulary)
        else:
            rewritten = _REWRITES[kind](caption)
        if rewritten is not None and rewritten.lower() != caption.lower() and rewritten not in out:
            out.append(rewritten)
    return out


def mirror_caption(caption: str, axis: str = "horizontal") -> str | None:
    """The caption of the image flipped along ``axis`` ("horizontal": left <-> right; "vertical": above <-> below,
    top <-> bottom), or ``None`` when it cannot be rewritten safely: text in the image, words whose meaning a
    flip breaks (compass points, hands; for vertical flips anything resting on or standing, the sky), or "left"
    / "right" not used as a side ("turned right", "all right"). A caption without words of the axis is returned
    unchanged (a flipped red circle is still a red circle)."""
    if axis not in MIRROR_WORDS:
        raise ValueError(f"axis must be 'horizontal' or 'vertical', got {axis!r}.")
    tokens = _tokens(caption)
    lowered = [t.lower for t in tokens]
    if any(w in _NO_MIRROR[axis] for w in lowered):
        return None
    mirror = MIRROR_WORDS[axis]
    replacements: dict[int, str] = {}
    for i, word in enumerate(lowered):
        if word not in mirror:
            continue
        if axis == "horizontal" and word in ("left", "right"):
            after = lowered[i + 1] if i + 1 < len(lowered) else "."
            before = lowered[i - 1] if i > 0 else ""
            if after not in _SIDE_AFTER and before not in _SIDE_BEFORE:
                return None
        new = mirror[word]
        replacements[i] = new.capitalize() if tokens[i].text[:1].isupper() else new
    return _render(caption, tokens, replacements) if replacements else caption


#: the kinds whose negatives keep the caption's bag of words (a tower that ignores word order ties them with the
#: caption): the ARO-style score averages these
ORDER_ONLY_KINDS: tuple[str, ...] = ("swap_attributes", "swap_objects")


def binding_scores(
    image_embeds: torch.Tensor,
    captions: list[str],
    encode_text: Callable[[list[str]], torch.Tensor],
    kinds: tuple[str, ...] = ("swap_attributes", "swap_objects", "swap_relation"),
) -> dict[str, float | int | None]:
    """How often a dual encoder ranks each image's true caption above its own rewrites (ARO-style).

    Args:
        image_embeds: (N, D) L2-normalised joint-space image embeddings.
        captions: N true captions, one per image.
        encode_text: list of S captions -> (S, D) L2-normalised joint-space text embeddings.
        kinds: rewrite kinds scored (captions a kind does not apply to are not counted for it).

    Returns:
        Per kind, the fraction of (image, rewrite) pairs where the true caption's similarity is higher (a tie
        counts one half: a tower blind to word order scores exactly 0.5 on :data:`ORDER_ONLY_KINDS`) and
        ``"<kind> pairs"``, the number of pairs; ``"aro"``: the mean of the order-only kinds' scores (``None``
        when neither applied).
    """
    import torch

    if image_embeds.shape[0] != len(captions):
        raise ValueError(f"{image_embeds.shape[0]} image embeddings but {len(captions)} captions.")
    out: dict[str, float | int | None] = {}
    for kind in check_negative_kinds(kinds):
        rewrite = _REWRITES.get(kind) or (lambda c: change_attribute(c, random.Random(0)))
        pairs = [(i, rewritten) for i, c in enumerate(captions) if (rewritten := rewrite(c)) is not None]
        out[f"{kind} pairs"] = len(pairs)
        if not pairs:
            out[kind] = None
            continue
        index = torch.tensor([i for i, _ in pairs])
        true = (image_embeds[index] * encode_text([captions[i] for i, _ in pairs])).sum(-1)
        false = (image_embeds[index] * encode_text([r for _, r in pairs])).sum(-1)
        wins = (true > false).float() + 0.5 * (true == false).float()
        out[kind] = round(wins.mean().item(), 4)
    order_only = [out[k] for k in ORDER_ONLY_KINDS if isinstance(out.get(k), float)]
    out["aro"] = round(sum(order_only) / len(order_only), 4) if order_only else None
    return out
