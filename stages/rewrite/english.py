"""English coreference and ellipsis resolution for conversational questions, on a spaCy parse.

Each turn is parsed (noun chunks, entities, dependencies). Its noun phrases become mentions of
discourse entities (see :mod:`stages.rewrite.discourse` for the salience model); then, in the new
question, these are rewritten:

- **pronouns** it / they / them / this / that / these / those (as pronouns, not determiners),
  he / him / she / her: replaced by the most salient earlier entity that agrees (he/she only
  with a PERSON; it not with a PERSON; they/them prefer plurals). Pleonastic *it* ("is it
  possible to ...", "how much does it cost to ...") and entities the question itself names are
  left alone;
- **possessives** its / their / his / her: ``X's`` (``X'`` after a plural in -s);
- **split antecedents**: they / them / their as a term of a symmetric predicate ("What do they have
  in common?", "How do they differ?", "between them", "the difference in their symptoms") with no
  plural antecedent: the two most salient earlier entities, "X and Y";
- **one-anaphora** ("a new one", "a smart one"): ``one`` becomes the antecedent's head phrase;
- **definite descriptions** ("the film" after "the Neverending Story film"): a definite noun
  phrase whose words all occur in a more specific earlier entity with the same head noun;
- **missing topic** (ellipsis, optional): a question that names nothing from the conversation,
  no entity and no proper noun, but asks about a definite noun phrase with no complement ("What
  are the main themes?") gets "of <topic>" after that phrase.
- **predicate ellipsis**: "What about X?", "How about X?", "And X?" ask the previous question again
  (as resolved) with X in place of its counterpart there: a phrase with X's preposition, a
  superlative phrase, an infinitive for a gerund, or an argument of X's kind and number ("Is chilli
  a stew?" ... "How about goulash?" -> "Is goulash a stew?"); X then holds the conversation's focus.

Before mentions are read, parser mistakes are mended: a name cut short ("[the Black Lives] Matter
campaign", "[the Model] 3") and a do-support question's verb read as a noun ("How much does [a used
car cost]?").

Every change records its span, the antecedent, the turn it came from, its salience and the rule.
History turns are resolved the same way first (their resolved pronouns count as mentions), and
the model after each history prefix is cached, so a conversation costs one parse per new turn.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field

from engine.cache import LRUCache
from engine.strictness import NoCoercion
from stages.rewrite.discourse import Antecedent, DiscourseModel, Mention, Replacement, SalienceWeights

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Span, Token

# Pronoun -> (gender class, number, possessive?). "any" gender: people or things.
PERSONAL_PRONOUNS: dict[str, tuple[str, str, bool]] = {
    "it": ("neuter", "singular", False),
    "its": ("neuter", "singular", True),
    "they": ("any", "plural", False),
    "them": ("any", "plural", False),
    "their": ("any", "plural", True),
    "he": ("person", "singular", False),
    "him": ("person", "singular", False),
    "his": ("person", "singular", True),
    "she": ("person", "singular", False),
    "her": ("person", "singular", False),  # possessive when the parser says ``poss``
}
DEMONSTRATIVES: dict[str, str] = {"this": "singular", "that": "singular", "these": "plural", "those": "plural"}
ARGUMENT_DEPS = frozenset({"nsubj", "nsubjpass", "dobj", "pobj", "attr", "dative", "oprd"})
SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass"})
OBJECT_DEPS = frozenset({"dobj", "attr", "oprd"})
# Nouns too general to be what a later pronoun means ("the different types of X": X is meant).
GENERIC_HEADS = frozenset(
    "thing things one ones way ways kind kinds type types sort sorts lot lots part parts difference differences "
    "example examples something anything everything nothing someone anyone everyone somebody anybody "
    "everybody time times fact facts idea ideas information detail details more most some all other others "
    "question questions answer answers reason reasons option options".split()
)
# Singular nouns that end in -s (diseases, fields of study): the tagger reads them as plurals and the
# lemmatiser strips the -s ("diabetes" -> "diabete"); they take singular verbs and "it".
SINGULAR_IN_S = frozenset("news diabetes measles mumps rabies herpes rickets shingles scabies physics mathematics "
                          "economics politics ethics genetics genomics linguistics athletics gymnastics aerobics "
                          "logistics robotics".split())
# Verbs and adjectives-with-"be" that take an extraposed clause with a dummy "it" subject.
EXTRAPOSING_VERBS = frozenset("cost take seem appear matter help hurt pay make require mean happen".split())
WEATHER_VERBS = frozenset("rain snow hail thunder drizzle".split())
# Adjectives of "tough movement": "it is hard to learn" may say something of "it".
TOUGH_ADJECTIVES = frozenset("easy easier easiest hard harder hardest difficult tough tougher simple simpler "
                             "impossible pleasant fun".split())
# Symmetric predicates: "they" as their subject (or "them" after "between") needs two things, so a single
# most-salient antecedent is half the answer ("What do they have in common?" after "the keto diet" ... "paleo").
SYMMETRIC_VERBS = frozenset("differ compare relate interact overlap agree conflict coexist correlate contrast "
                            "resemble meet".split())
SYMMETRIC_ADJECTIVES = frozenset("different similar alike same related comparable equivalent identical "
                                 "interchangeable compatible distinct".split())
SYMMETRIC_NOUNS = frozenset("difference similarity relationship relation comparison contrast distinction link "
                            "connection".split())
# Prepositions that name the second term of a symmetric predicate ("compare with X", "different from X").
SECOND_TERM_PREPOSITIONS = frozenset("with to from than as against".split())
# The preposition that introduces a left-out second term ("different from X", "similar to X").
SECOND_TERM_OF = {"different": "from", "distinct": "from", "differ": "from", "similar": "to", "related": "to",
                  "comparable": "to", "identical": "to", "equivalent": "to", "compare": "to"}
# Nouns whose two terms are coordinated under 'between' ("the difference between X and Y").
BETWEEN_NOUNS = frozenset("difference similarity contrast distinction comparison".split())
NUMERIC_LABELS = frozenset({"CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY", "DATE", "TIME"})
NOT_IN_PHRASE = frozenset({"VERB", "AUX", "ADV", "SCONJ", "ADP", "PRON", "INTJ"})
TYPE_NOUNS = frozenset("type kind sort variety style".split())
ADVERBIAL_PREPOSITIONS = frozenset("in on at during within after before since until by".split())
# Words that may open a verbless follow-up ("And Jared?", "OK, what about ...") and adverbials that may close
# one ("What about Venus flytraps in particular?").
FRAGMENT_OPENERS = frozenset("and but so then also ok okay oh well interesting".split())
FRAGMENT_CLOSERS = (("in", "particular"), ("as", "well"), ("instead",), ("then",), ("too",), ("also",),
                    ("specifically",), ("now",))
NAME_POS = frozenset({"PROPN", "NOUN", "ADJ", "VERB"})  # what a capitalised word inside a name may be tagged
FINITE_TAGS = frozenset({"VBD", "VBZ", "VBP", "MD"})
LEADING_DROPPED = frozenset({"a", "an", "some", "any", "this", "that", "these", "those", "my", "your", "our",
                             "his", "her", "its", "their", "which", "what", "another", "each", "every", "no"})


class EnglishHeuristics(NoCoercion):
    """Which English rewrites are on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pronouns: bool = Field(True, description="it/they/them/he/she/him/her and demonstrative pronouns")
    possessives: bool = Field(True, description="its/their/his/her -> X's")
    one_anaphora: bool = Field(True, description="'a new one' -> 'a new <antecedent head phrase>'")
    number_agreement: bool = Field(
        True, description="a replacement takes the pronoun's number: 'they' after 'virtual machine' -> 'virtual machines'"
    )
    nominal_ellipsis: bool = Field(
        True, description="a missing head noun gets the topic's: 'the largest' -> 'the largest mammal', "
        "'so many' -> 'so many bees', 'what type' -> 'what type of orange tree'",
    )
    acronyms: bool = Field(
        True, description="an acronym whose letters are the initials of an earlier phrase is spelt out ('VMs' -> "
        "'virtual machines')",
    )
    definite_descriptions: bool = Field(True, description="'the film' -> 'the Neverending Story film'")
    missing_topic: bool = Field(
        True, description="append 'of <topic>' to a definite noun phrase of a question that names nothing"
    )
    split_antecedents: bool = Field(
        True, description="they/them/their of a symmetric predicate ('have in common', 'differ', 'between them', "
        "'the difference in their ...') with no plural antecedent: the two most salient earlier entities, 'X and Y'",
    )
    second_term: bool = Field(
        True, description="a symmetric predicate naming one term only takes the topic as the other: 'What is the "
        "difference with Bologna?' -> 'the difference between mortadella and Bologna', 'How is a container "
        "different?' -> 'different from a virtual machine', 'How does an ESA compare?' -> 'compare to a 529 plan'",
    )
    predicate_ellipsis: bool = Field(
        True, description="'What about X?' / 'How about X?' / 'And X?' asks the previous question again with X in "
        "place of its counterpart there ('Is chilli a stew?' ... 'How about goulash?' -> 'Is goulash a stew?')",
    )


@dataclass(frozen=True)
class Resolution:
    """The outcome for one question."""

    rewritten: str
    replacements: tuple[Replacement, ...]
    candidates: tuple[Antecedent, ...]  # the discourse entities considered, most salient first
    turn: int  # the question's turn number


# --------------------------------------------------------------------------- mentions


_CONTRASTIVE = frozenset({"other", "former", "latter", "same"})


def _entity_of(span: "Span") -> "Span | None":
    """The non-numeric named entity overlapping ``span``, if any."""
    for ent in span.doc.ents:
        if ent.label_ not in NUMERIC_LABELS and ent.start < span.end and span.start < ent.end:
            return ent
    return None


def _content_start(span: "Span") -> int:
    """Index of the phrase's first word: after anything the parser wrongly put in the chunk (a verb, an
    auxiliary, a wh-word) and after leading determiners/possessives other than 'the'."""
    start = span.start
    for token in span:
        if token.i < span.root.i and (token.pos_ in NOT_IN_PHRASE or token.tag_ in ("WP", "WRB", "WDT")):
            start = token.i + 1
    if start == span.start and span.doc[start].pos_ == "CCONJ" and start < span.end - 1:
        start += 1  # "And Jared?"
    while start < span.end - 1 and span.doc[start].lower_ in LEADING_DROPPED:
        start += 1
    return start


def _role(token: "Token") -> str:
    """The grammatical role that weighs a mention (see :class:`SalienceWeights`)."""
    if token.dep_ in SUBJECT_DEPS:
        return "subject"
    if token.dep_ in OBJECT_DEPS:
        return "object"
    if token.dep_ == "pobj" and token.head.lower_ == "about" and token.head.dep_ == "ROOT":
        return "subject"  # "What about X?", "How about X?": X is what the turn is about
    if token.dep_ == "pobj":
        preposition, governor = token.head, token.head.head
        if preposition.lower_ == "of" and governor.pos_ in ("NOUN", "PROPN", "PRON"):
            return "complement"
        if preposition.lower_ in ADVERBIAL_PREPOSITIONS and governor.pos_ in ("VERB", "AUX", "ADJ"):
            return "adjunct"
    return "other"


def _has_of_complement(token: "Token") -> bool:
    return any(child.dep_ == "prep" and child.lower_ == "of" and any(g.dep_ in ("pobj", "pcomp") for g in child.children)
               for child in token.children)  # pcomp: "the effects of consuming energy drinks"


def _clause(token: "Token") -> int:
    """Index of the verb or auxiliary heading the clause ``token`` is in."""
    current = token
    while current.pos_ not in ("VERB", "AUX") and current.head.i != current.i:
        current = current.head
    return current.i


def _singular_in_use(root: "Token") -> bool:
    """A noun tagged plural that is singular here: one of :data:`SINGULAR_IN_S`, or the subject of a verb in
    the singular ("What is diabetes?", "Mumps spreads ...": subject-verb agreement outranks the -s)."""
    if root.tag_ != "NNS":
        return False
    if root.lower_ in SINGULAR_IN_S:
        return True
    head = root.head
    if head.tag_ != "VBZ" and head.lower_ not in ("was", "has", "does"):
        return False
    if root.dep_ in SUBJECT_DEPS:
        return True
    # "What is X?": X is the copula's attribute, and the verb agrees with it (the subject is the wh-word)
    return root.dep_ == "attr" and all(c.tag_ in ("WP", "WDT") for c in head.children if c.dep_ in SUBJECT_DEPS)


def _plural(root: "Token", end: int | None = None) -> bool:
    """A plural noun, or the head of a coordination that ends before ``end`` (the phrase includes a conjunct)."""
    return (root.tag_ in ("NNS", "NNPS") and not _singular_in_use(root)) or any(
        child.dep_ == "conj" and (end is None or child.i < end) for child in root.children)


def _key(span: "Span", start: int) -> str:
    """Entity key: the phrase without determiners, its head lemmatised, case-folded."""
    words = [t.lower_ for t in span.doc[start : span.end] if t.lower_ != "the"]
    if words:
        words[-1] = span.root.lemma_.lower() if span.root.i == span.end - 1 else words[-1]
    return " ".join(words)


def _is_candidate(chunk: "Span") -> bool:
    root = chunk.root
    if not any(ch.isalnum() for ch in chunk.text):
        return False  # an emoji or a symbol is not a name a question can be rewritten with
    if root.pos_ in ("PRON", "NUM") or root.tag_ in ("WP", "WDT", "PRP", "PRP$", "EX"):
        return False
    if root.lower_ in GENERIC_HEADS and not any(c.dep_ == "compound" for c in root.children):
        return False  # "the types of X" means X; but a "stock option" or "blood type" is a thing of its own
    if root.lower_ in PERSONAL_PRONOUNS or root.lower_ in DEMONSTRATIVES:
        return False
    if root.pos_ == "VERB" and root.lemma_ in WEATHER_VERBS:
        return False  # "It's raining": weather, not a thing a pronoun goes back to
    ent = _entity_of(chunk)
    if ent is None and any(e.label_ in NUMERIC_LABELS and e.start <= root.i < e.end for e in chunk.doc.ents):
        return False
    if ent is None and any(child.dep_ == "det" and child.tag_ in ("WDT", "WP") for child in root.children):
        return False  # "What variety ...?", "Which foods ...?": the question's unknown, not something known
    if any(c.lower_ in ("many", "much") and any(g.lower_ == "how" for g in c.children) for c in root.children):
        return False  # "How many barrels ...?": likewise
    return True


def chunk_mention(chunk: "Span", turn: int) -> Mention:
    """A noun chunk as a mention of a discourse entity."""
    start = _content_start(chunk)
    doc = chunk.doc
    text_start = start - 1 if start > chunk.start and doc[start - 1].lower_ in ("a", "an") else start
    text = doc[text_start : chunk.end].text
    bare_start = start + 1 if doc[start].lower_ == "the" and start < chunk.end - 1 else start
    ent = _entity_of(chunk)
    root = chunk.root
    role = "relational" if _has_of_complement(root) else _role(root)
    proper = any(t.pos_ == "PROPN" or t.is_title and not t.is_sent_start for t in doc[start : chunk.end])
    other_number = None
    if root.i == chunk.end - 1 and root.pos_ == "NOUN" and root.is_alpha and not root.is_title \
            and not (ent is not None and ent.start <= root.i < ent.end):  # "Venus flytraps" -> "Venus flytrap"
        stem = doc[start : chunk.end - 1].text_with_ws if root.i > start else ""
        if root.tag_ == "NNS" and root.lemma_.lower() != root.lower_ and not _singular_in_use(root):
            other_number = stem + (root.lemma_ if root.text.islower() else root.text[: len(root.lemma_)])
        elif root.tag_ == "NN" and not any(child.dep_ == "conj" for child in root.children):
            other_number = stem + pluralise(root.text)
    return Mention(
        key=_key(chunk, start), text=text, bare=doc[bare_start : chunk.end].text, head=root.lower_,
        turn=turn, role=role, plural=_plural(root, chunk.end),
        person=ent is not None and ent.label_ == "PERSON" and ent.start <= root.i < ent.end,
        entity=ent.label_ if ent is not None else None, proper=proper, other_number=other_number,
    )


def pluralise(noun: str) -> str:
    """The regular English plural of a singular noun ('machine' -> 'machines', 'box' -> 'boxes',
    'study' -> 'studies'); nouns already ending in -s are left as they are (they are often mass nouns:
    'physics', 'diabetes')."""
    lower = noun.lower()
    if lower.endswith("s"):
        return noun
    if lower.endswith(("x", "z", "ch", "sh")):
        return noun + "es"
    if lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


@dataclass(frozen=True)
class _Placed:
    """A mention of the turn being read, with where it is (for antecedents inside the same question)."""

    mention: Mention
    end: int  # token index after the phrase
    clause: int
    root: int  # token index of the phrase's head


MISTAGGED_POS = frozenset({"VERB", "ADJ", "ADV", "X", "INTJ"})
NOMINAL_MODIFIER_DEPS = frozenset({"compound", "amod", "det", "nmod", "poss"})


def _mistagged_nominal(token: "Token") -> bool:
    """A word the tagger got wrong in a place only a noun can be: 'Does melatonin help?' (melatonin: VERB,
    nsubj), 'What is blockchain?' (blockchain: ADJ, the complement of a 'What is ...?' question)."""
    if token.pos_ == "NOUN" and token.dep_ == "acomp" and token.is_alpha:
        return True  # "Is chilli a stew?": a noun parsed as an adjectival complement
    if token.pos_ not in MISTAGGED_POS or token.tag_ in ("WP", "WRB", "WDT", "JJS", "JJR", "RBS", "RBR") \
            or not token.is_alpha:
        return False
    if any(child.lower_ in ("most", "least", "more", "less") for child in token.children):
        return False  # "the most famous": an adjective whose noun is elided, see _nominal_ellipsis
    if token.dep_ in ARGUMENT_DEPS and not (token.pos_ == "ADJ" and token.dep_ in ("attr", "oprd")):
        # (a predicative adjective is an adjective: "Why is learning a language difficult?")
        # a real verb or adjective there governs its own clause; a mis-tagged noun governs nothing of that kind
        return not any(child.dep_ in ("nsubj", "nsubjpass", "aux", "auxpass", "dobj", "mark", "ccomp", "xcomp")
                       for child in token.children)
    if token.dep_ == "acomp" and token.head.lemma_ == "be":
        # "What is X?": the question defines X
        asks_what = any(child.tag_ == "WP" and child.dep_ in ("nsubj", "attr") for child in token.head.children)
        last = all(t.is_punct for t in token.doc[token.i + 1 :])
        return asks_what and last and not any(child.dep_ in ("advmod", "prep") for child in token.children)
    return False


def noun_phrases(doc: "Doc") -> list["Span"]:
    """spaCy's noun chunks plus mis-tagged nominals (see :func:`_mistagged_nominal`), in text order."""
    chunks = [_repaired(chunk) for chunk in doc.noun_chunks]
    chunks = [c for c in chunks if len(c) and not any(o.start < c.start < o.end for o in chunks)]
    covered = {token.i for chunk in chunks for token in chunk}
    for chunk in list(chunks):
        # people named inside a phrase about something else ("the Lewis and Clark expedition"): "they" may
        # mean them ("What did they discover?"); coordinated names form one group
        people = [e for e in doc.ents if e.label_ == "PERSON" and chunk.start <= e.start and e.end <= chunk.root.i
                  and e.root.dep_ in ("compound", "nmod", "conj")]
        if people:
            chunks.append(doc[people[0].start : people[-1].end])
    for chunk in list(chunks):
        # a coordination of things ("metformin and lisinopril") is a plural mention of its own, the group a later
        # "they" means; each conjunct stays a singular mention
        conjuncts = [c for c in chunk.root.conjuncts if c.i > chunk.root.i and c.pos_ in ("NOUN", "PROPN")]
        if conjuncts and chunk.root.pos_ in ("NOUN", "PROPN") and chunk.end <= conjuncts[-1].i:
            last = next((c for c in chunks if c.start <= conjuncts[-1].i < c.end), None)
            if last is not None and all(doc[i].dep_ in ("cc", "conj", "punct", "det", "amod", "compound", "poss",
                                                       "nmod", "case") or doc[i].pos_ in ("NOUN", "PROPN", "ADJ")
                                        for i in range(chunk.end, last.start)):
                chunks.append(doc[chunk.start : last.end])
    for token in doc:
        if token.dep_ == "poss" and token.pos_ in ("PROPN", "NOUN"):
            # the possessor of "Melania Trump's religion" is a mention of its own (spaCy's chunk is the whole)
            start = token.i
            while start > 0 and doc[start - 1].dep_ in ("compound", "amod", "det") and doc[start - 1].head.i == token.i:
                start -= 1
            chunks.append(doc[start : token.i + 1])
    for token in doc:
        if token.i in covered or not _mistagged_nominal(token):
            continue
        start = token.i
        while start > 0 and doc[start - 1].dep_ in NOMINAL_MODIFIER_DEPS and doc[start - 1].head.i >= token.i \
                and doc[start - 1].i not in covered:
            start -= 1
        chunks.append(doc[start : token.i + 1])
    return sorted(chunks, key=lambda span: span.start)


def _repaired(chunk: "Span") -> "Span":
    """Mistakes of the parser, mended: a name cut short ('[the Black Lives] Matter campaign': the
    capitalised words that follow and the noun they modify belong to it; '[the Model] 3': so does the
    number after a proper noun) and a do-support question's
    verb taken for a noun ('How much does [a used Lamborghini cost]?': no verb after 'does', so the
    question's last word is it)."""
    doc = chunk.doc
    end = chunk.end
    if end < len(doc) and doc[end].pos_ == "NUM" and doc[end].dep_ == "nummod" and doc[end - 1].pos_ == "PROPN" \
            and chunk.start <= doc[end].head.i < end and not any(e.end == end for e in doc.ents):
        return doc[chunk.start : end + 1]  # a name's number ("the Model 3"), unless NER ends the name before it
    if doc[end - 1].is_title and not doc[end - 1].is_sent_start:
        while end < len(doc) and doc[end].is_title and not doc[end].is_sent_start and doc[end].pos_ in NAME_POS:
            end += 1
        if end > chunk.end and end < len(doc) and doc[end].pos_ == "NOUN" and doc[end - 1].head.i == end:
            end += 1
        if end > chunk.end:
            return doc[chunk.start : end]
    last = doc[end - 1]
    sentence = last.sent
    support = [t.i for t in sentence if t.lemma_ == "do" and t.pos_ in ("AUX", "VERB") and t.i < last.i - 1]
    if support and last.pos_ == "NOUN" and (last.dep_ in SUBJECT_DEPS or last.dep_ == "ROOT") \
            and all(t.is_punct for t in doc[end : sentence.end]) \
            and not any(t.pos_ == "VERB" and t.lemma_ != "do" and t.dep_ not in ("amod", "compound") for t in sentence):
        return doc[max(chunk.start, support[-1] + 1) : end - 1]
    return chunk


def _mentions(doc: "Doc", turn: int) -> list[_Placed]:
    return [_Placed(chunk_mention(chunk, turn), chunk.end, _clause(chunk.root), chunk.root.i)
            for chunk in noun_phrases(doc) if _is_candidate(chunk)]


# --------------------------------------------------------------------------- what to resolve


def _pleonastic(token: "Token") -> bool:
    """A dummy 'it': expletive, weather, or the subject of an extraposed clause ('it costs X to ...')."""
    if token.dep_ == "expl":
        return True
    if token.dep_ not in SUBJECT_DEPS:
        return False
    head = token.head
    # weather: "it rains", "it's raining" (the parser makes the verb the copula's attribute), "is it going to rain?"
    predicates = [head, *(c for c in head.children if c.dep_ in ("attr", "xcomp", "acomp"))]
    predicates += [g for p in predicates[1:] for g in p.children if g.dep_ == "xcomp"]
    if any(p.lemma_ in WEATHER_VERBS for p in predicates):
        return True
    if any(c.dep_ == "ccomp" and c.i > token.i for c in head.children) and (
        token.dep_ == "nsubjpass"  # "it is said that ...", "it is believed ..."
        or head.lemma_ == "be" and any(c.dep_ in ("acomp", "attr") and c.pos_ == "ADJ" for c in head.children)
    ):  # "is it true (that) coffee raises ...?": the clause is the real subject, whether or not 'that' is parsed
        return True
    extraposed = False
    infinitive = None
    for other in head.subtree:
        if other.i <= token.i:
            continue
        if other.tag_ == "TO" and other.head.pos_ in ("VERB", "AUX") and other.head.i > other.i:
            extraposed = True
            infinitive = other.head
        if other.dep_ == "mark" and other.lower_ in ("that", "whether", "if") and other.head.head == head:
            extraposed = True
    if not extraposed:
        return False
    if head.lemma_ in EXTRAPOSING_VERBS:
        return True
    adjectives = [c for c in head.children if c.dep_ in ("acomp", "attr") and c.pos_ == "ADJ"]
    if head.lemma_ != "be" or not adjectives:
        return False
    # "Is it easier to learn than Spanish?": a tough adjective whose infinitive lacks its object says
    # something of "it" (it is easy to learn it), so "it" refers
    tough = any(a.lemma_.lower() in TOUGH_ADJECTIVES or a.lower_ in TOUGH_ADJECTIVES for a in adjectives)
    return not (tough and infinitive is not None and not any(c.dep_ in ("dobj", "ccomp", "xcomp")
                                                             for c in infinitive.children))


QUOTES = frozenset('"\u201c\u201d\u00ab\u00bb')


def _quoted(token: "Token") -> bool:
    """Whether ``token`` lies inside double quotation marks (an odd number of them before it in the text).
    The quoted token indices are found in one pass and kept with the parse (``Doc.text`` is rebuilt on every
    read: counting per pronoun made a long question full of pronouns quadratic)."""
    doc = token.doc
    quoted = doc.user_data.get("sieve_quoted")
    if quoted is None:
        inside, found = False, set()
        for t in doc:
            if inside:
                found.add(t.i)
            inside ^= sum(ch in QUOTES for ch in t.text) % 2 == 1
        quoted = doc.user_data["sieve_quoted"] = frozenset(found)
    return token.i in quoted


def _demonstrative_pronoun(token: "Token") -> bool:
    """'this'/'that'/... standing alone as an argument, not determining a noun or introducing a clause."""
    return (
        token.lower_ in DEMONSTRATIVES
        and token.tag_ == "DT"
        and token.dep_ in ARGUMENT_DEPS
        and not any(child.dep_ in ("prep", "relcl", "acl") for child in token.children)
    )


def _one_anaphor(token: "Token") -> bool:
    """'one'/'ones' heading a noun phrase with a determiner or adjective ('a new one', 'important ones')."""
    return (
        token.lower_ in ("one", "ones")
        and token.dep_ != "nummod"
        and any(child.dep_ in ("det", "amod") for child in token.children)
        and not any(child.dep_ == "prep" and child.lower_ == "of" for child in token.children)
    )


def _symmetric(token: "Token") -> bool:
    """A plural pronoun that a symmetric predicate asks for both terms of: 'What do they have in common?',
    'How are they different?', 'How do they differ?', 'compare between them', 'the difference in their
    symptoms' (not 'How do they compare with tigers?', which names the second term)."""
    def names_second_term(word: "Token") -> bool:
        return any(c.dep_ == "prep" and c.lower_ in SECOND_TERM_PREPOSITIONS
                   and any(g.dep_ == "pobj" for g in c.children) for c in word.children)

    if token.dep_ == "pobj":
        return token.head.lower_ in ("between", "among")
    if token.dep_ == "poss":
        return any(a.pos_ == "NOUN" and a.lemma_.lower() in SYMMETRIC_NOUNS and not names_second_term(a)
                   for a in token.ancestors)
    head = token.head
    if token.dep_ not in SUBJECT_DEPS and not (token.dep_ == "dobj" and head.lemma_ == "compare"):
        return False
    if names_second_term(head):
        return False
    if head.lemma_ in SYMMETRIC_VERBS:
        return True
    in_common = any(c.dep_ == "prep" and c.lower_ == "in" and [g.lower_ for g in c.children] == ["common"]
                    for c in head.children)
    if head.lemma_ == "have" and in_common:
        return True
    return head.lemma_ == "be" and any(
        c.dep_ in ("acomp", "attr") and c.lemma_.lower() in SYMMETRIC_ADJECTIVES and not names_second_term(c)
        for c in head.children
    )


# --------------------------------------------------------------------------- choosing antecedents


def _agrees(antecedent: Antecedent, gender: str) -> bool:
    if gender == "person":
        return antecedent.person or antecedent.maybe_person
    if gender == "neuter":
        return not antecedent.person
    return True


def _choose(candidates: Sequence[Antecedent], gender: str, number: str, weights: SalienceWeights,
            exclude: set[str]) -> Antecedent | None:
    """The most salient agreeing antecedent (number disagreement costs a factor, not a veto)."""
    best: tuple[float, Antecedent] | None = None
    for antecedent in candidates:
        if antecedent.key in exclude or not _agrees(antecedent, gender):
            continue
        score = antecedent.salience
        if (number == "plural") != antecedent.plural:
            score *= weights.number_mismatch
        if score < weights.min_salience:
            continue
        if best is None or score > best[0] + 1e-12:
            best = (score, antecedent)
    return best[1] if best is not None else None


def _possessive(text: str) -> str:
    return text + ("'" if text.endswith("s") else "'s")


def _shouted(doc: "Doc") -> bool:
    """A question written in capitals ("IS IT CURABLE?")."""
    letters = [ch for ch in doc.text if ch.isalpha()]
    return len(letters) > 1 and all(ch.isupper() for ch in letters)


def _cased(replacement: str, token: "Token") -> str:
    """Capitalise a replacement that starts a sentence; all of it in a question written in capitals."""
    if _shouted(token.doc):
        return replacement.upper()
    if token.is_sent_start and replacement[:1].islower():
        return replacement[:1].upper() + replacement[1:]
    return replacement


PARSE_CACHE_CHARS = 2000  # longer turns are parsed each time they are read, not kept


class EnglishResolver:
    """Resolves a question against its conversation with a spaCy pipeline. Thread-safe."""

    def __init__(self, nlp: "Language", weights: SalienceWeights, heuristics: EnglishHeuristics,
                 cache_size: int = 512):
        self.nlp = nlp
        self.weights = weights
        self.heuristics = heuristics
        self._lock = threading.Lock()
        self._states: LRUCache[tuple[str, ...], DiscourseModel] = LRUCache(cache_size, per_asker=True)
        # parses by text: a history read again (its oldest turns dropped by a window, or edited) costs no re-parse
        self._parses: LRUCache[str, "Doc"] = LRUCache(cache_size * 2, per_asker=True)

    # ------------------------------------------------------------------ public

    def resolve(self, question: str, history: Sequence[str]) -> Resolution:
        """Rewrite ``question`` given the earlier turns ``history`` (oldest first)."""
        model = self._state(tuple(history))
        turn = len(history) + 1
        replacements, following = self._read(model, question, turn)
        # the next turn's history is this one's plus this question: keep the model it will need
        self._states.put((*history, question), following)
        return Resolution(_apply(question, replacements), tuple(replacements), tuple(model.candidates(turn)), turn)

    # ------------------------------------------------------------------ history

    def _state(self, history: tuple[str, ...]) -> DiscourseModel:
        """The discourse model after reading ``history`` (cached per prefix): from the longest prefix
        already read, the remaining turns are read in order (a loop, so any length of history works)."""
        read = len(history)
        model = self._states.get(history)
        while model is None and read > 0:
            read -= 1
            model = self._states.get(history[:read])
        if model is None:
            model = DiscourseModel(self.weights)
            self._states.put((), model)
        for turn in range(read + 1, len(history) + 1):
            _, model = self._read(model, history[turn - 1], turn)
            self._states.put(history[:turn], model)
        return model

    def _parse(self, text: str) -> "Doc":
        """spaCy's parse of ``text``; parses of texts up to PARSE_CACHE_CHARS are kept (without the tok2vec
        tensor, which nothing here reads: a cached Doc costs about its tokens), since a Doc is only read."""
        doc = self._parses.get(text)
        if doc is None:
            with self._lock:
                doc = self.nlp(text)
            if len(text) <= PARSE_CACHE_CHARS:
                doc.tensor = doc.tensor[:, :0]
                self._parses.put(text, doc)
        return doc

    def _read(self, model: DiscourseModel, text: str, turn: int) -> tuple[list[Replacement], DiscourseModel]:
        """Turn ``turn`` read against the model of the turns before it: its replacements, and the model
        after it (its mentions added, the turn as resolved kept for "What about X?")."""
        if not text.strip():  # an empty turn says nothing and is no question to go back to
            return [], model
        doc = self._parse(text)
        replacements, mentions = self._analyse(doc, turn, model)
        following = model.copy()
        following.mentions.extend(_mark_new(mentions, model))
        if any(t.pos_ in ("VERB", "AUX") for t in doc) or any(r.kind == "predicate_ellipsis" for r in replacements):
            following.previous = _apply(text, replacements)
        # else: "thanks", "ok", "?!": no predicate for a later "What about X?" to reuse; the question before stays
        return replacements, following

    # ------------------------------------------------------------------ one turn

    def _analyse(self, doc: "Doc", turn: int, model: DiscourseModel) -> tuple[list[Replacement], list[Mention]]:
        """The replacements for one turn and the mentions it adds to the model."""
        placed = _mentions(doc, turn)
        mentions = [p.mention for p in placed]
        candidates = model.candidates(turn)
        replacements: list[Replacement] = []
        taken: set[int] = set()  # token indices already rewritten
        numbers: dict[str, str] = {}  # antecedent key -> number of the pronoun that took it
        heuristics = self.heuristics
        if candidates:
            for token in doc:
                replacement = None
                if heuristics.pronouns or heuristics.possessives:
                    replacement = self._pronoun(token, self._pool(token, candidates, placed), numbers, mentions, turn)
                if replacement is None and heuristics.one_anaphora and _one_anaphor(token):
                    replacement = self._one(token, self._pool(token, candidates, placed), mentions, turn)
                if replacement is not None:
                    replacements.append(replacement)
                    taken.add(token.i)
            if heuristics.acronyms:
                replacements.extend(self._acronyms(doc, candidates, taken))
            if heuristics.nominal_ellipsis:
                replacements.extend(self._nominal_ellipsis(doc, candidates, placed, taken))
            if heuristics.definite_descriptions:
                replacements.extend(self._definites(doc, candidates, taken, mentions, turn))
            if heuristics.second_term:
                replacements.extend(self._second_term(doc, candidates, placed, taken, mentions, turn))
            if heuristics.predicate_ellipsis and model.previous:
                rebuilt = self._predicate_ellipsis(doc, model.previous, replacements, placed, mentions, turn)
                if rebuilt is not None:
                    replacements = [r for r in replacements if not rebuilt.start <= r.start < rebuilt.end] + [rebuilt]
                    replacements.sort(key=lambda r: r.start)
                    return replacements, mentions
            if heuristics.missing_topic and not replacements:
                replacement = self._missing_topic(doc, candidates, model, mentions, turn)
                if replacement is not None:
                    replacements.append(replacement)
        replacements.sort(key=lambda r: r.start)
        return replacements, mentions

    def _pool(self, token: "Token", candidates: list[Antecedent], placed: list[_Placed]) -> list[Antecedent]:
        """Antecedents for ``token``: earlier turns' entities the question does not name itself, plus, for
        the subject of a coordinated clause, a subject or object of an earlier clause ("who are X and what
        were they ...")."""
        here = {p.mention.key for p in placed}
        clause = _clause(token)
        previous = {a.key: a for a in candidates}
        local: dict[str, Antecedent] = {}
        # only a subject pronoun of a coordinated clause looks back inside the question, and a possessive
        # in a coordinated noun phrase ("feijoada and its significance": feijoada)
        coordinated = token.dep_ in SUBJECT_DEPS and token.doc[clause].dep_ == "conj"
        head = token.head
        conjunct_of = head.head.i if token.dep_ == "poss" and head.dep_ == "conj" and head.head.i < token.i else None
        sentence_start = token.sent.start
        for item in placed:
            if item.mention.key in local:
                continue
            earlier_sentence = item.end <= sentence_start  # "They met at the Kit Kat Club? Where is that?"
            if item.root != conjunct_of and not earlier_sentence and (
                not coordinated or item.end > token.i or item.clause == clause
                or item.mention.role not in ("subject", "object")
            ):
                continue
            mention = item.mention
            weight = mention.weight(self.weights)
            earlier = previous.get(mention.key)
            local[mention.key] = Antecedent(
                key=mention.key, text=mention.text, bare=mention.bare, turn=mention.turn, named_turn=mention.turn,
                salience=weight + (earlier.salience if earlier is not None else 0.0),
                factors={("earlier_sentence" if earlier_sentence else "same_question"): weight,
                         "earlier_turns": earlier.salience if earlier is not None else 0.0},
                plural=mention.plural, person=mention.person, other_number=mention.other_number,
            )
        pool = list(local.values()) + [a for a in candidates if a.key not in here]
        pool.sort(key=lambda a: (-a.salience, -a.turn, a.key))
        return pool

    def _pronoun(self, token: "Token", candidates: list[Antecedent], numbers: dict[str, str],
                 mentions: list[Mention], turn: int) -> Replacement | None:
        lower = token.lower_
        if _quoted(token) or (token.text[:1].isupper() and not token.is_sent_start and not _shouted(token.doc)):
            return None  # a title or a quotation ('the book "It Ends With Us"'): not the speaker's reference
        if lower in PERSONAL_PRONOUNS and token.pos_ == "PRON":
            gender, number, possessive = PERSONAL_PRONOUNS[lower]
            if lower == "her":
                possessive = token.dep_ == "poss"
            if possessive and not self.heuristics.possessives:
                return None
            if not possessive and not self.heuristics.pronouns:
                return None
            if lower in ("it", "its") and _pleonastic(token):
                return None
            kind = "possessive" if possessive else "personal"
            heuristic = f"{kind} pronoun '{lower}' ({gender}, {number}): most salient agreeing antecedent"
        elif self.heuristics.pronouns and _demonstrative_pronoun(token):
            gender, number, possessive = "neuter", DEMONSTRATIVES[lower], False
            heuristic = f"demonstrative pronoun '{lower}' ({number}): most salient antecedent"
        else:
            return None
        # a plural and a singular pronoun in one question do not mean the same thing ("their role in it")
        disjoint = {key for key, taken_by in numbers.items() if taken_by != number}
        antecedent = _choose(candidates, gender, number, self.weights, disjoint)
        if antecedent is None:
            return None
        if number == "plural" and not antecedent.plural and self.heuristics.split_antecedents \
                and antecedent.key not in numbers and "same_question" not in antecedent.factors and _symmetric(token):
            second = next((a for a in candidates if a.key != antecedent.key and a.key not in disjoint and not a.plural
                           and a.person == antecedent.person and "same_question" not in a.factors
                           and a.salience >= self.weights.min_salience), None)
            if second is not None:
                return self._split(token, (antecedent, second), possessive, numbers, mentions, turn)
        already = antecedent.key in numbers
        numbers.setdefault(antecedent.key, number)
        mentions.append(antecedent.mention(turn, _role(token) if not possessive else "other", via=lower))
        if already or "same_question" in antecedent.factors:
            # "What is X and why is it important?", "How did it get its name?" (once "it" is rewritten): the
            # question itself says what the pronoun is, so it stays as asked (the model still records the mention)
            return None
        text = antecedent.text
        if self.heuristics.number_agreement and antecedent.other_number and (number == "plural") != antecedent.plural:
            text = antecedent.other_number  # "How do they work?" after "a virtual machine": virtual machines
        text = _possessive(text) if possessive else text
        return Replacement(token.idx, token.idx + len(token.text), token.text, _cased(text, token),
                           "possessive" if possessive else "pronoun", heuristic, antecedent)

    def _split(self, token: "Token", antecedents: tuple[Antecedent, Antecedent], possessive: bool,
               numbers: dict[str, str], mentions: list[Mention], turn: int) -> Replacement:
        """'they' of a symmetric predicate -> 'X and Y'. Both entities are mentioned again, as plain mentions
        (no subject or pronoun-continuation bonus): each is half of what the pronoun meant, and a newer entity
        keeps the focus ("How is it related to keto?" after "What is intermittent fasting?")."""
        parts = []
        for antecedent in antecedents:
            numbers.setdefault(antecedent.key, "plural")
            mentions.append(antecedent.mention(turn, "other"))
            parts.append(Replacement(token.idx, token.idx + len(token.text), token.text, antecedent.text, "pronoun",
                                     "one of the two terms of the symmetric predicate", antecedent))
        text = " and ".join(a.text for a in antecedents)
        text = _possessive(text) if possessive else text
        return Replacement(
            token.idx, token.idx + len(token.text), token.text, _cased(text, token),
            "possessive" if possessive else "pronoun",
            f"'{token.lower_}' of a symmetric predicate and no plural antecedent: the two most salient entities",
            antecedents[0], tuple(parts),
        )

    def _one(self, token: "Token", candidates: list[Antecedent], mentions: list[Mention], turn: int) -> Replacement | None:
        plural = token.lower_ == "ones"
        antecedent = _choose(candidates, "neuter", "plural" if plural else "singular", self.weights, set())
        if antecedent is None:
            return None
        # "the largest one" after "mammals" -> "the largest mammal"; "important ones" after "database"
        number = plural if self.heuristics.number_agreement else antecedent.plural
        bare = antecedent.bare_in(number)
        other = antecedent.bare_in(not number) if antecedent.other_number else None
        modifiers = [child for child in token.lefts if child.dep_ in ("amod", "compound", "nmod")]
        for modifier in modifiers:  # "the largest one" after "the largest mammals": not "largest largest"
            bare, other = _after_word(bare, modifier.lower_), _after_word(other, modifier.lower_) if other else other
        if modifiers:
            # "a smart one": a new, more specific entity (a smart garage door opener), which later
            # pronouns may mean ("How could they be hacked?")
            words = token.doc[min(m.left_edge.i for m in modifiers) : token.i].text
            mentions.append(Mention(
                key=f"{words.lower()} {antecedent.key}", text=f"{words} {bare}", bare=f"{words} {bare}",
                head=antecedent.key.split()[-1], turn=turn, role=_role(token), plural=plural, person=False,
                entity=None, proper=False, other_number=f"{words} {other}" if other else None,
            ))
        else:
            mentions.append(antecedent.mention(turn, _role(token), via=token.lower_, plural=plural))
        return Replacement(token.idx, token.idx + len(token.text), token.text, bare, "one_anaphora",
                           f"'{token.lower_}' heading a noun phrase: the antecedent's head phrase", antecedent)

    def _acronyms(self, doc: "Doc", candidates: list[Antecedent], taken: set[int]) -> list[Replacement]:
        """'VMs' after 'a virtual machine' -> 'virtual machines': the letters are the phrase's initials."""
        found = []
        for token in doc:
            text = token.text
            plural = len(text) > 2 and text.endswith("s") and text[:-1].isupper()
            letters = text[:-1] if plural else text
            if token.i in taken or not (2 <= len(letters) <= 6 and letters.isalpha() and letters.isupper()):
                continue
            for antecedent in candidates:
                words = [w for w in antecedent.bare.split() if w.lower() not in ("a", "an", "the")]
                if len(words) != len(letters) or any(w[0].lower() != l.lower() for w, l in zip(words, letters)):
                    continue
                expansion = antecedent.bare_in(plural)
                found.append(Replacement(token.idx, token.idx + len(text), text, expansion, "acronym",
                                         f"'{text}' spells the initials of '{antecedent.text}'", antecedent))
                taken.add(token.i)
                break
        return found

    def _nominal_ellipsis(self, doc: "Doc", candidates: list[Antecedent], placed: list[_Placed],
                          taken: set[int]) -> list[Replacement]:
        """Noun phrases without their noun take the topic's: a superlative ('What is the largest in the
        world?' -> 'the largest mammal'), 'so/how many' with no noun ('Why are so many dying?'), and a
        wh-determined 'type/kind/sort/variety' with no complement ('What type has thorns?' -> 'What type
        of orange tree')."""
        here = {p.mention.key for p in placed}
        # a common noun: what a superlative or 'so many' leaves out is never a name
        topic = next((a for a in candidates if a.key not in here and not a.person and not a.proper), None)
        if topic is None or topic.salience < self.weights.min_salience:
            return []

        def form(plural: bool, adjective: str = "") -> str:
            return _after_word(topic.bare_in(plural), adjective)

        found = []
        for token in doc:
            if token.i in taken:
                continue
            nominal = token.dep_ in ARGUMENT_DEPS
            if token.pos_ == "ADJ" and nominal and (
                token.tag_ == "JJS" or any(c.lower_ in ("most", "least") for c in token.children)
            ) and any(c.lower_ == "the" and c.dep_ == "det" for c in token.children) and not _has_noun_subject(token):
                insert = f" {self._ungraded(form(False, token.lower_))}"
                rule = f"superlative '{token.text}' without a noun"
            elif token.lower_ in ("many", "few") and token.head.pos_ in ("VERB", "AUX") and token.i > 0 \
                    and doc[token.i - 1].lower_ in ("so", "how", "too"):
                insert, rule = f" {form(True)}", f"'{doc[token.i - 1].text} {token.text}' without a noun"
            elif token.lower_ in TYPE_NOUNS and any(c.dep_ == "det" and c.tag_ in ("WDT", "WP") for c in token.children) \
                    and not any(c.dep_ == "prep" and c.lower_ == "of" for c in token.children) \
                    and not (token.i + 1 < len(doc) and doc[token.i + 1].pos_ in ("NOUN", "PROPN")):
                insert, rule = f" of {form(False)}", f"'{token.text}' without its complement"
            else:
                continue
            end = token.idx + len(token.text)
            found.append(Replacement(end, end, "", insert, "ellipsis",
                                     f"{rule}: the topic's noun ('{topic.text}')", topic))
            taken.add(token.i)
        return found

    def _second_term(self, doc: "Doc", candidates: list[Antecedent], placed: list[_Placed], taken: set[int],
                     mentions: list[Mention], turn: int) -> list[Replacement]:
        """A symmetric predicate that names one term and leaves the other out takes the topic as the other:
        'the difference with Y' -> 'the difference between X and Y', 'the relationship to Y' -> 'the
        relationship of X to Y', 'How is Y different?' -> 'different from X', 'How does Y compare?' ->
        'compare to X'. Not for a pronoun or a coordinated or plural term ('How are they different?', 'How
        did the results differ?': they may mean each other), nor when the question names both terms."""
        here = {p.mention.key for p in placed}
        topic = next((a for a in candidates if a.key not in here and a.salience >= self.weights.min_salience), None)
        if topic is None:
            return []
        found: list[Replacement] = []
        for token in doc:
            if token.i in taken:
                continue
            lemma = token.lemma_.lower()
            preps = [c for c in token.children if c.dep_ == "prep"]
            if token.pos_ == "NOUN" and lemma in SYMMETRIC_NOUNS:
                # 'the difference with Y' / 'the relationship to Y': one term, no 'between', 'of', 'in' or possessor
                term_prep = next((c for c in preps if c.lower_ in ("with", "to")), None)
                if term_prep is None or any(c.lower_ in ("between", "among", "of", "in") for c in preps) \
                        or any(c.dep_ == "poss" for c in token.children):
                    continue
                objects = [g for g in term_prep.children if g.dep_ == "pobj"]
                if len(objects) != 1 or not self._single_term(objects[0], plural=True):
                    continue
                term_end = objects[0].right_edge.idx + len(objects[0].right_edge.text)
                if lemma in BETWEEN_NOUNS:
                    term = doc.text[objects[0].left_edge.idx:term_end]
                    change = Replacement(term_prep.idx, term_end, doc.text[term_prep.idx:term_end],
                                         f"between {topic.text} and {term}", "ellipsis",
                                         f"'{token.text} {term_prep.text} ...' names one term: the topic is the other", topic)
                else:
                    end = token.idx + len(token.text)
                    change = Replacement(end, end, "", f" of {topic.text}", "ellipsis",
                                         f"'{token.text} {term_prep.text} ...' names one term: the topic is the other", topic)
            elif lemma in SECOND_TERM_OF and not any(c.lower_ in SECOND_TERM_PREPOSITIONS | {"between", "among"} for c in preps):
                subject = self._predicate_subject(token)
                if subject is None or not self._single_term(subject):
                    continue
                end = token.idx + len(token.text)
                change = Replacement(end, end, "", f" {SECOND_TERM_OF[lemma]} {topic.text}", "ellipsis",
                                     f"'{token.text}' with one term ('{subject.text}'): the topic is the other", topic)
            else:
                continue
            found.append(change)
            taken.add(token.i)
            break  # one left-out term per question
        return found

    @staticmethod
    def _single_term(token: "Token", plural: bool = False) -> bool:
        """A noun phrase that is one term: not a pronoun, not coordinated, and not plural unless ``plural``
        (a plural subject of 'differ' may mean its members differ from each other)."""
        return token.pos_ in ("NOUN", "PROPN", "ADJ") and (plural or token.tag_ not in ("NNS", "NNPS")) \
            and not any(c.dep_ in ("conj", "cc") for c in token.children)

    @staticmethod
    def _predicate_subject(token: "Token") -> "Token | None":
        """The subject of 'Y is different' / 'Y differs' / 'does Y compare', where ``token`` ends the question
        (a do-support verb the parser read as a noun, 'does [an ESA compare]', included)."""
        doc = token.doc
        rest = [t for t in doc[token.i + 1 : token.sent.end] if not t.is_punct]
        if rest:
            return None
        if token.pos_ == "ADJ" and token.dep_ == "acomp" and token.head.lemma_ == "be":
            return next((c for c in token.head.children if c.dep_ in ("nsubj", "nsubjpass")), None)
        if token.pos_ == "VERB" and not any(c.dep_ in ("dobj", "obj") for c in token.children):
            return next((c for c in token.children if c.dep_ == "nsubj"), None)
        if token.pos_ == "NOUN" and token.tag_ == "NN" and token.dep_ == "ROOT" and token.i > 0:
            # 'How does an ESA compare?': the parser took the verb for the head noun of its subject
            previous = doc[token.i - 1]
            auxiliary = any(t.lower_ in ("does", "do", "did") for t in doc[token.sent.start : token.i])
            return previous if auxiliary and previous.dep_ == "compound" else None
        return None

    def _ungraded(self, phrase: str) -> str:
        """``phrase`` after its last superlative or comparative ('youngest rock' -> 'rock'): the question's
        own superlative takes its place ('the oldest' -> 'the oldest rock', not 'the oldest youngest rock')."""
        with self._lock:
            tokens = self.nlp(phrase)
        graded = [t.i for t in tokens if t.tag_ in ("JJS", "JJR", "RBS", "RBR") and t.i < len(tokens) - 1]
        return tokens[graded[-1] + 1 :].text if graded else phrase

    def _definites(self, doc: "Doc", candidates: list[Antecedent], taken: set[int], mentions: list[Mention],
                   turn: int) -> list[Replacement]:
        """'the film' -> 'the Neverending Story film': a definite phrase subsumed by a salient earlier entity."""
        found = []
        for chunk in doc.noun_chunks:
            if doc[chunk.start].lower_ != "the" or len(chunk) < 2 or any(t.i in taken for t in chunk):
                continue
            if _entity_of(chunk) is not None or any(t.pos_ == "PROPN" for t in chunk) or chunk.root.pos_ != "NOUN":
                continue
            if any(child.dep_ in ("prep", "appos") for child in chunk.root.children):
                continue  # "the history of Rome", "the horse Artax" are specific already
            if chunk.end < len(doc) and doc[chunk.end].pos_ == "PROPN":
                continue
            words = {t.lower_ for t in chunk[1:]}
            head = chunk.root.lemma_.lower()
            for antecedent in candidates:
                antecedent_words = set(antecedent.key.split())
                if antecedent.salience < self.weights.min_salience or antecedent.person:
                    continue
                if antecedent.key.split()[-1] != head or len(antecedent_words) <= len(words):
                    continue
                if not {w for w in words if w != chunk.root.lower_} <= antecedent_words:
                    continue
                found.append(Replacement(
                    chunk.start_char, chunk.end_char, chunk.text, _cased(antecedent.text, chunk[0]),
                    "definite_description",
                    f"definite '{chunk.text}' names an earlier, more specific entity with the same head noun",
                    antecedent,
                ))
                # the phrase is a mention of that entity
                _relabel(mentions, {_key(chunk, chunk.start)}, key=antecedent.key, text=antecedent.text,
                         bare=antecedent.bare, person=False, entity=None, proper=False, via="the", other_number=None)
                break
        return found

    def _missing_topic(self, doc: "Doc", candidates: list[Antecedent], model: DiscourseModel,
                       mentions: list[Mention], turn: int) -> Replacement | None:
        """A question naming nothing from the conversation: '<the definite phrase> of <topic>'."""
        if any(m.entity is not None or m.proper for m in mentions):
            return None
        if any(t.tag_ in ("JJS", "RBS") and t.head.pos_ == "NOUN" for t in doc):
            return None  # "the largest organ in the body", "the safest antibiotic": a superlative sets its own scope
        known = {m.key for m in model.mentions} | {m.head for m in model.mentions}
        if any(m.key in known or m.head in known for m in mentions):
            return None
        target = None
        for chunk in doc.noun_chunks:
            if doc[chunk.start].lower_ == "the" and chunk.root.pos_ == "NOUN" and chunk.root.tag_ != "VBG" and not any(
                child.dep_ in ("prep", "relcl", "acl", "appos") for child in chunk.root.children
            ) and not (chunk.end < len(doc) and doc[chunk.end].pos_ == "PROPN") and not any(
                (t.dep_ == "nummod" and chunk.root.tag_ == "NNS") or t.lower_ in _CONTRASTIVE for t in chunk[1:]
            ):  # "the two fats", "the other fat": a set or a contrast within the conversation, not a relation
                # ("the 321 method" is a name)
                target = chunk
        if target is None:
            return None
        topic = next((a for a in candidates if not a.person), None)
        if topic is None or topic.salience < self.weights.min_salience:
            return None
        # The phrase is relational ("the symptoms" of X: weak as a later antecedent), and X is mentioned
        # again, as its complement.
        _relabel(mentions, {_key(target, _content_start(target))}, role="relational")
        mentions.append(topic.mention(turn, "complement"))
        end = target.end_char  # after a coordination: "the pros and cons" + " of X"
        for conjunct in target.root.conjuncts:
            if conjunct.i > target.root.i and conjunct.pos_ in ("NOUN", "PROPN"):
                end = max(end, conjunct.idx + len(conjunct.text))
        return Replacement(
            end, end, "", f" of {topic.text}", "ellipsis",
            f"the question names nothing from the conversation; its definite phrase '{target.text}' is taken to be "
            "about the most salient entity", topic,
        )

    def _predicate_ellipsis(self, doc: "Doc", previous: str, replacements: list[Replacement], placed: list[_Placed],
                            mentions: list[Mention], turn: int) -> Replacement | None:
        """'What about X?', 'How about X?', 'And X?' (no verb of their own) borrow the previous question's
        predicate: that question again, as resolved, with X in place of its counterpart there. The
        counterpart is, by X's form: a phrase with X's preposition ('What is the largest mammal in the
        world?' / 'What about in the UK?'), else, for a place or time, X is added ('... on Christmas eve');
        the phrase with a superlative ('the youngest crust' / 'the oldest'); the infinitive ('to fix it' /
        'replacing it'); for a noun phrase, an argument of the same kind (proper or common noun) and
        number, the subject first ('Is chilli a stew?' / 'How about goulash?'). No counterpart: unchanged."""
        span = _fragment(doc)
        if span is None:
            return None
        inside = [r for r in replacements if span.start_char <= r.start and r.end <= span.end_char]
        resolved = _apply(doc.text[span.start_char : span.end_char],
                          [replace(r, start=r.start - span.start_char, end=r.end - span.start_char) for r in inside])
        before = self._parse(previous)
        if not len(before):
            return None  # an empty previous turn asked nothing to ask again
        sentence = list(before.sents)[-1]
        phrases = [c for c in noun_phrases(before) if sentence.start <= c.start and c.end <= sentence.end
                   and _is_candidate(c)]
        found = _counterpart(span, resolved, sentence, phrases)
        if found is None:
            return None
        start, end, text, counterpart = found
        body = before.text[sentence.start_char : start] + text + before.text[end : sentence.end_char]
        body = body[:1].upper() + body[1:]
        sentence_end = span.sent.end_char
        original = doc.text[span.sent.start_char : sentence_end]
        # a noun phrase X takes its counterpart's place as what the conversation is about now (a place or
        # time does not)
        focus = {p.mention.key for p in placed if span.start <= p.root < span.end} if counterpart and \
            span[0].pos_ != "ADP" and span.root.pos_ in ("NOUN", "PROPN") else set()
        # ... unless the counterpart was relational ("the main advantages" of X / "disadvantages"): then X is
        # too, and the conversation is still about X's complement
        role = "relational" if any(c.start_char == start and _has_of_complement(c.root) for c in phrases) else "focus"
        _relabel(mentions, focus, role=role)
        # the arguments the rebuilt question repeats are mentioned again
        for chunk in phrases:
            if chunk.end_char <= start or chunk.start_char >= end:
                mentions.append(replace(chunk_mention(chunk, turn), role="other"))
        where = f"in place of '{counterpart}'" if counterpart else "added"
        return Replacement(
            span.sent.start_char, sentence_end, original, body, "predicate_ellipsis",
            f"'{original}' has no predicate of its own: the previous question ('{sentence.text}') asked again with "
            f"'{resolved}' {where}", None, tuple(inside),
        )


def _fragment(doc: "Doc") -> "Span | None":
    """The X of a verbless follow-up question in ``doc``'s last sentence: 'What about X?', 'How about X?',
    'And X?' (after an optional 'and', 'so', 'OK', ...; before an optional 'in particular', 'instead',
    ...). None when the sentence is anything else, or X is a clause of its own ('And how about what
    happened to Brown?')."""
    if not len(doc):
        return None
    sentence = list(doc.sents)[-1]
    tokens = [t for t in sentence if not t.is_punct]
    lead = 0
    while lead < len(tokens) and (tokens[lead].lower_ in FRAGMENT_OPENERS or tokens[lead].pos_ == "INTJ"):
        lead += 1
    rest = tokens[lead:]
    if len(rest) >= 2 and rest[0].lower_ in ("what", "how") and rest[1].lower_ == "about":
        rest = rest[2:]
    elif not (lead and tokens[0].lower_ == "and"):
        return None
    lowered = [t.lower_ for t in rest]
    for closer in FRAGMENT_CLOSERS:
        if len(rest) > len(closer) and tuple(lowered[-len(closer):]) == closer:
            rest = rest[: -len(closer)]
            break
    if not rest or any(t.tag_ in FINITE_TAGS or t.tag_ in ("WP", "WRB", "WDT") for t in rest):
        return None
    return doc[rest[0].i : rest[-1].i + 1]


def _counterpart(fragment: "Span", resolved: str, sentence: "Span",
                 phrases: list["Span"]) -> tuple[int, int, str, str] | None:
    """Where the fragment ``resolved`` goes in the previous question ``sentence`` (whose candidate noun
    phrases are ``phrases``): (start, end) character offsets in its document, the text to put there and
    what it replaces ("" for an addition)."""
    first, root = fragment[0], fragment.root

    def subtree(token: "Token") -> tuple[int, int, str]:
        left, right = token.left_edge, token.right_edge
        return left.idx, right.idx + len(right.text), sentence.doc[left.i : right.i + 1].text

    if first.pos_ == "ADP" and first.dep_ in ("prep", "ROOT"):  # "What about in the UK?", "And for a cat?"
        same = [t for t in sentence if t.dep_ == "prep" and t.lower_ == first.lower_]
        if same:
            start, end, text = subtree(same[-1])
            return start, end, resolved, text
        if first.lower_ not in ADVERBIAL_PREPOSITIONS:
            return None
        last = sentence[-1]
        end = last.idx if last.is_punct else last.idx + len(last.text)
        return end, end, " " + resolved, ""
    if root.tag_ == "JJS":  # "What about the oldest?"
        for token in sentence:
            if token.tag_ == "JJS" and token.pos_ == "ADJ":
                phrase = token.head if token.dep_ == "amod" else token
                start, end, text = subtree(phrase)
                return start, end, resolved, text
        return None
    if root.tag_ == "VBG" and root.i == first.i:  # "How about replacing it instead?"
        for token in sentence:
            if token.tag_ == "VB" and any(c.tag_ == "TO" for c in token.children):
                right = token.right_edge
                end = right.idx + len(right.text)
                verb = root.lemma_ + resolved[len(first.text):]
                return token.idx, end, verb, sentence.doc[token.i : right.i + 1].text
        return None
    if root.pos_ not in ("NOUN", "PROPN"):
        return None
    proper = root.pos_ == "PROPN"
    plural = _plural(root)
    coordinated = any(c.dep_ == "conj" for c in root.children)
    best = None
    for chunk in phrases:
        head = chunk.root
        if head.dep_ not in ARGUMENT_DEPS and not (head.dep_ == "acomp" and head.pos_ == "NOUN"):
            continue
        if head.dep_ == "attr" and head.head.lemma_ == "be" and any(c.lower_ in ("a", "an") for c in head.children):
            continue  # "Is chilli a stew?": a classification, not the thing asked about
        if (head.pos_ == "PROPN") != proper or (not coordinated and _plural(head) != plural):
            continue
        if head.dep_ in SUBJECT_DEPS or head.dep_ == "acomp":
            rank = 0
        else:
            rank = 1 if head.dep_ in OBJECT_DEPS or head.dep_ == "dative" else 2
        if best is None or rank <= best[0]:
            best = (rank, head)
    if best is None:
        return None
    head = best[1]
    start, end, text = subtree(head)
    if _has_of_complement(head) and not _has_of_complement(root) and not any(c.dep_ == "poss" for c in root.children):
        # "What are the symptoms of flu?" / "What about treatments?": the treatments of flu
        end = head.idx + len(head.text)
        text = sentence.doc.text[start:end]
    return start, end, resolved, text


def _has_noun_subject(adjective: "Token") -> bool:
    """'Which museums are the most popular?': the clause's own subject supplies the superlative's noun."""
    return any(child.dep_ in SUBJECT_DEPS and child.i != adjective.i and child.pos_ in ("NOUN", "PROPN")
               for child in adjective.head.children)


def _after_word(text: str, word: str) -> str:
    """``text`` without its words up to ``word`` when ``word`` is one of them but not the last (the
    modifier is already in the question: 'the largest' + 'largest mammals' -> 'mammals')."""
    words = text.split()
    lowered = [w.lower() for w in words]
    if word and word in lowered[:-1]:
        return " ".join(words[lowered.index(word) + 1 :])
    return text


def _relabel(mentions: list[Mention], keys: set[str], **changes: Any) -> None:
    """The turn's own mentions (not a pronoun's) of the entities ``keys``, changed in place."""
    for index, mention in enumerate(mentions):
        if mention.via is None and mention.key in keys:
            mentions[index] = replace(mention, **changes)


def _mark_new(mentions: list[Mention], model: DiscourseModel) -> list[Mention]:
    """Flag the mentions whose entity the conversation has not mentioned before."""
    known = {m.key for m in model.mentions}
    marked = []
    for mention in mentions:
        if mention.key not in known and mention.via is None:
            mention = replace(mention, new=True)
            known.add(mention.key)
        marked.append(mention)
    return marked


def _apply(text: str, replacements: Sequence[Replacement]) -> str:
    pieces: list[str] = []
    cursor = 0
    for replacement in sorted(replacements, key=lambda r: r.start):
        if replacement.start < cursor:
            continue  # overlapping (should not happen): the first one wins
        pieces.append(text[cursor : replacement.start])
        pieces.append(replacement.replacement)
        cursor = replacement.end
    pieces.append(text[cursor:])
    return "".join(pieces)


def describe_candidates(candidates: Sequence[Antecedent], limit: int, trace_text: bool) -> list[dict[str, Any]]:
    """The top antecedent candidates for the trace."""
    records = []
    for antecedent in candidates[:limit]:
        record = antecedent.to_dict()
        if not trace_text:
            record.pop("text")
        records.append(record)
    return records
