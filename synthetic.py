"""
The built-in synthetic corpus: child-directed English from a small probabilistic grammar, with BLiMP-style
minimal pairs from the same grammar (corpus.prepare("synthetic", ...) writes both).

It is a teaching corpus for machines without data: it trains fast and its pairs are learnable, but scores on
it say nothing about BabyLM. Every word form is spelled out in the lexicon, so a recogniser (see the tests)
needs no morphology. Agreement classes: "I" (am/was), "3sg" (is/was, -s), "pl" (are/were, base form; also
"you").

    synthetic_corpus(n_words, seed)             -> documents, one sentence per line
    synthetic_minimal_pairs(n_per_phenomenon)   -> BLiMP-format records, one UID per phenomenon
"""

import random
from collections import namedtuple

# -----------------------------------------------------------------------------
# The lexicon

Noun = namedtuple("Noun", "plural kind gender")  # kind: animal/person/thing/food; gender of the singular
NOUNS = {
    "dog": Noun("dogs", "animal", "n"), "cat": Noun("cats", "animal", "n"), "bird": Noun("birds", "animal", "n"),
    "duck": Noun("ducks", "animal", "n"), "bunny": Noun("bunnies", "animal", "n"),
    "horse": Noun("horses", "animal", "n"), "cow": Noun("cows", "animal", "n"), "pig": Noun("pigs", "animal", "n"),
    "frog": Noun("frogs", "animal", "n"), "bear": Noun("bears", "animal", "n"), "lion": Noun("lions", "animal", "n"),
    "monkey": Noun("monkeys", "animal", "n"), "puppy": Noun("puppies", "animal", "n"),
    "kitty": Noun("kitties", "animal", "n"), "mouse": Noun("mice", "animal", "n"),
    "boy": Noun("boys", "person", "m"), "girl": Noun("girls", "person", "f"), "man": Noun("men", "person", "m"),
    "woman": Noun("women", "person", "f"), "sister": Noun("sisters", "person", "f"),
    "brother": Noun("brothers", "person", "m"), "baby": Noun("babies", "person", "n"),
    "ball": Noun("balls", "thing", "n"), "book": Noun("books", "thing", "n"), "cup": Noun("cups", "thing", "n"),
    "box": Noun("boxes", "thing", "n"), "car": Noun("cars", "thing", "n"), "truck": Noun("trucks", "thing", "n"),
    "block": Noun("blocks", "thing", "n"), "spoon": Noun("spoons", "thing", "n"), "shoe": Noun("shoes", "thing", "n"),
    "hat": Noun("hats", "thing", "n"), "sock": Noun("socks", "thing", "n"), "chair": Noun("chairs", "thing", "n"),
    "table": Noun("tables", "thing", "n"), "bed": Noun("beds", "thing", "n"), "door": Noun("doors", "thing", "n"),
    "window": Noun("windows", "thing", "n"), "toy": Noun("toys", "thing", "n"), "doll": Noun("dolls", "thing", "n"),
    "train": Noun("trains", "thing", "n"), "boat": Noun("boats", "thing", "n"), "bus": Noun("buses", "thing", "n"),
    "house": Noun("houses", "thing", "n"), "tree": Noun("trees", "thing", "n"),
    "flower": Noun("flowers", "thing", "n"), "blanket": Noun("blankets", "thing", "n"),
    "bag": Noun("bags", "thing", "n"), "brush": Noun("brushes", "thing", "n"),
    "crayon": Noun("crayons", "thing", "n"), "puzzle": Noun("puzzles", "thing", "n"),
    "picture": Noun("pictures", "thing", "n"), "balloon": Noun("balloons", "thing", "n"),
    "leaf": Noun("leaves", "thing", "n"), "kite": Noun("kites", "thing", "n"), "bike": Noun("bikes", "thing", "n"),
    "bottle": Noun("bottles", "thing", "n"), "towel": Noun("towels", "thing", "n"),
    "apple": Noun("apples", "food", "n"), "banana": Noun("bananas", "food", "n"),
    "cookie": Noun("cookies", "food", "n"), "cake": Noun("cakes", "food", "n"), "egg": Noun("eggs", "food", "n"),
    "sandwich": Noun("sandwiches", "food", "n"), "carrot": Noun("carrots", "food", "n"),
    "cracker": Noun("crackers", "food", "n"), "grape": Noun("grapes", "food", "n"),
    "berry": Noun("berries", "food", "n"), "muffin": Noun("muffins", "food", "n"),
    "peach": Noun("peaches", "food", "n"), "potato": Noun("potatoes", "food", "n"),
}
NAMES = {"Mommy": "f", "Daddy": "m", "Grandma": "f", "Grandpa": "m", "Anna": "f", "Lily": "f", "Emma": "f",
         "Sarah": "f", "Max": "m", "Tom": "m", "Ben": "m", "Jack": "m", "Sam": "m"}
ADJECTIVES = {  # "animate": only said of people and animals
    "big": "any", "little": "any", "red": "any", "blue": "any", "green": "any", "yellow": "any", "hot": "any",
    "cold": "any", "soft": "any", "funny": "any", "nice": "any", "wet": "any", "dirty": "any", "clean": "any",
    "pretty": "any", "new": "any", "old": "any", "happy": "animate", "sad": "animate", "hungry": "animate",
    "sleepy": "animate", "tired": "animate", "silly": "animate",
}
Verb = namedtuple("Verb", "s3 past frames obj refl")  # obj: kind of object; refl: a reflexive object makes sense
_I, _T, _D = frozenset({"intr"}), frozenset({"tr"}), frozenset({"ditr"})
VERBS = {
    "sleep": Verb("sleeps", "slept", _I, None, False), "cry": Verb("cries", "cried", _I, None, False),
    "laugh": Verb("laughs", "laughed", _I, None, False), "smile": Verb("smiles", "smiled", _I, None, False),
    "fall": Verb("falls", "fell", _I, None, False), "come": Verb("comes", "came", _I, None, False),
    "go": Verb("goes", "went", _I, None, False), "sneeze": Verb("sneezes", "sneezed", _I, None, False),
    "yawn": Verb("yawns", "yawned", _I, None, False), "giggle": Verb("giggles", "giggled", _I, None, False),
    "nap": Verb("naps", "napped", _I, None, False), "sit": Verb("sits", "sat", _I, None, False),
    "wait": Verb("waits", "waited", _I, None, False),
    "see": Verb("sees", "saw", _T, "any", True), "hear": Verb("hears", "heard", _T, "any", True),
    "like": Verb("likes", "liked", _T, "any", True), "love": Verb("loves", "loved", _T, "any", True),
    "want": Verb("wants", "wanted", _T, "thing", False), "need": Verb("needs", "needed", _T, "thing", False),
    "find": Verb("finds", "found", _T, "any", False), "hold": Verb("holds", "held", _T, "any", False),
    "eat": Verb("eats", "ate", _T, "food", False), "take": Verb("takes", "took", _T, "thing", False),
    "make": Verb("makes", "made", _T, "thing", False), "catch": Verb("catches", "caught", _T, "any", False),
    "push": Verb("pushes", "pushed", _T, "any", False), "pull": Verb("pulls", "pulled", _T, "any", False),
    "kick": Verb("kicks", "kicked", _T, "thing", False), "hug": Verb("hugs", "hugged", _T, "animate", True),
    "kiss": Verb("kisses", "kissed", _T, "animate", False), "tickle": Verb("tickles", "tickled", _T, "animate", True),
    "wash": Verb("washes", "washed", _T, "any", True), "help": Verb("helps", "helped", _T, "animate", True),
    "feed": Verb("feeds", "fed", _T, "animate", False), "carry": Verb("carries", "carried", _T, "any", False),
    "drop": Verb("drops", "dropped", _T, "thing", False), "open": Verb("opens", "opened", _T, "thing", False),
    "break": Verb("breaks", "broke", _T, "thing", False), "build": Verb("builds", "built", _T, "thing", False),
    "buy": Verb("buys", "bought", _T, "thing", False), "draw": Verb("draws", "drew", _T, "any", False),
    "touch": Verb("touches", "touched", _T, "any", True),
    "throw": Verb("throws", "threw", _T | _D, "thing", False),
    "bring": Verb("brings", "brought", _T | _D, "thing", False),
    "give": Verb("gives", "gave", _D, "thing", False), "show": Verb("shows", "showed", _T | _D, "thing", False),
    "hand": Verb("hands", "handed", _D, "thing", False), "send": Verb("sends", "sent", _D, "thing", False),
}
PREPOSITIONS = ("on", "in", "under", "near", "behind")
PRONOUNS = {  # subject -> (object, reflexive, agreement)
    "I": ("me", "myself", "I"), "you": ("you", "yourself", "pl"), "he": ("him", "himself", "3sg"),
    "she": ("her", "herself", "3sg"), "it": ("it", "itself", "3sg"), "we": ("us", "ourselves", "pl"),
    "they": ("them", "themselves", "pl"),
}
DETERMINERS = {"the": "any", "a": "sg", "an": "sg", "this": "sg", "that": "sg", "these": "pl", "those": "pl",
               "some": "pl", "two": "pl", "three": "pl", "my": "any", "your": "any", "his": "any", "her": "any",
               "our": "any"}
_DET_WEIGHT = {"the": 8, "a": 4, "my": 2, "your": 2}  # how often the grammar says each; the rest 1
COPULA = {("present", "I"): "am", ("present", "3sg"): "is", ("present", "pl"): "are",
          ("past", "I"): "was", ("past", "3sg"): "was", ("past", "pl"): "were"}
DO = {("present", "I"): "do", ("present", "3sg"): "does", ("present", "pl"): "do",
      ("past", "I"): "did", ("past", "3sg"): "did", ("past", "pl"): "did"}
REFLEXIVE = {"m": "himself", "f": "herself", "n": "itself"}

ANIMATE = ("animal", "person")
OBJECT_KINDS = {"any": ("animal", "person", "thing", "food"), "thing": ("thing", "food"), "food": ("food",),
                "animate": ANIMATE}
INTRANSITIVE = sorted(v for v in VERBS if "intr" in VERBS[v].frames)
TRANSITIVE = sorted(v for v in VERBS if "tr" in VERBS[v].frames)
DITRANSITIVE = sorted(v for v in VERBS if "ditr" in VERBS[v].frames)
NP = namedtuple("NP", "words agr refl pron animate")  # pron: the subject pronoun it is, for binding

# -----------------------------------------------------------------------------
# The grammar and the corpus


def verb_form(lemma, tense, agr):
    """tense: "present", "past" or "base" (after do/does/did, in imperatives)."""
    if tense == "past":
        return VERBS[lemma].past
    return VERBS[lemma].s3 if tense == "present" and agr == "3sg" else lemma


def overregularize(lemma):
    """The past tense a child makes by rule: take -> taked, go -> goed, sit -> sitted."""
    if lemma.endswith("e"):
        return lemma + "d"
    if len(lemma) == 3 and lemma[0] not in "aeiou" and lemma[1] in "aeiou" and lemma[2] not in "aeiouwxy":
        return lemma + lemma[2] + "ed"
    return lemma + "ed"


IRREGULAR = sorted(v for v in VERBS if VERBS[v].past not in (v + "ed", v + "d", v[:-1] + "ied", v + v[-1] + "ed"))


class _Grammar:
    """The productions of the grammar, one method per nonterminal. A document keeps coming back to a small
    cast (two names, ten nouns), as a parent talking to a child does."""

    def __init__(self, rng, topical=True):
        self.rng = rng
        self.names = rng.sample(sorted(NAMES), 2) if topical else []
        self.topic = rng.sample(sorted(NOUNS), 10) if topical else []

    def p(self, prob):
        return self.rng.random() < prob

    def tense(self):
        return "present" if self.p(0.6) else "past"

    def noun(self, kinds):
        pool = [n for n in self.topic if NOUNS[n].kind in kinds]
        if pool and self.p(0.6):
            return self.rng.choice(pool)
        return self.rng.choice([n for n in sorted(NOUNS) if NOUNS[n].kind in kinds])

    def name(self, avoid=()):
        """A name; `avoid` keeps the subject's own name out of its objects ("Anna sees Anna")."""
        names = [n for n in self.names if n not in avoid]
        name = self.rng.choice(names) if names and self.p(0.7) else self.rng.choice(sorted(set(NAMES) - set(avoid)))
        return NP([name], "3sg", REFLEXIVE[NAMES[name]], None, True)

    def pronoun(self, animate_only=True):
        choices = [w for w in PRONOUNS if not (animate_only and w == "it")]
        w = self.rng.choice(choices)
        obj, refl, agr = PRONOUNS[w]
        return NP([w], agr, refl, w, w != "it")

    def det_np(self, kinds, number=None, det=None, adj=0.25, rc=0.0):
        """Det (Adj) N (that-clause): determiner and noun agree in number; a/an by the next word."""
        noun = self.noun(kinds)
        number = number or ("sg" if self.p(0.6) else "pl")
        if det is None:
            dets = [d for d, n in DETERMINERS.items() if n in ("any", number) and d != "an"]
            det = self.rng.choices(dets, weights=[_DET_WEIGHT.get(d, 1) for d in dets])[0]
        animate = NOUNS[noun].kind in ANIMATE
        words = [det]
        if self.p(adj):
            words.append(self.rng.choice([a for a, k in ADJECTIVES.items() if animate or k == "any"]))
        words.append(noun if number == "sg" else NOUNS[noun].plural)
        if words[0] == "a" and words[1][0] in "aeio":
            words[0] = "an"
        refl = REFLEXIVE[NOUNS[noun].gender] if number == "sg" else "themselves"
        np_ = NP(words, "3sg" if number == "sg" else "pl", refl, None, animate)
        if self.p(rc):
            np_ = np_._replace(words=words + self.relative_clause(np_))
        return np_

    def subject(self, kinds=ANIMATE, pp=0.08, rc=0.06):
        r = self.rng.random()
        if r < 0.2:
            return self.pronoun(animate_only=kinds == ANIMATE)
        if r < 0.4:
            return self.name()
        np_ = self.det_np(kinds)
        if self.p(pp):  # the verb still agrees with the head noun, not with the noun inside the PP
            np_ = np_._replace(words=np_.words + self.pp())
        if self.p(rc):
            np_ = np_._replace(words=np_.words + self.relative_clause(np_))
        return np_

    def pp(self, number=None):
        return [self.rng.choice(PREPOSITIONS)] + self.det_np(("thing",), number=number, adj=0.15).words

    def relative_clause(self, head):
        """that + a finite VP agreeing with the head noun; no reflexives, no nesting. Things only "are"."""
        tense = self.tense()
        if not head.animate or self.p(0.3):
            return ["that", COPULA[tense, head.agr]] + self.predicate(head)
        return ["that"] + self.vp(head, tense, refl=False, nested=False)

    def predicate(self, subj):
        """What follows a copula: an adjective, or where something is."""
        if self.p(0.3):
            return self.pp()
        return [self.rng.choice([a for a, k in ADJECTIVES.items() if subj.animate or k == "any"])]

    def obj(self, lemma, subj, refl=True, nested=True):
        kinds = OBJECT_KINDS[VERBS[lemma].obj]
        if refl and VERBS[lemma].refl and subj.refl and self.p(0.12):
            return [subj.refl]  # a reflexive agrees with the subject of its clause
        r = self.rng.random()
        if "person" in kinds and r < 0.15:
            # no "I see me", "we see us": a plain pronoun may not be bound in its clause
            choices = [w for w in PRONOUNS if w != "it" and w != subj.pron]
            return [PRONOUNS[self.rng.choice(choices)][0]]
        if "person" in kinds and r < 0.3:
            return self.name(avoid=subj.words).words
        return self.det_np(kinds, rc=0.05 if nested else 0.0).words

    def vp(self, subj, tense, refl=True, nested=True):
        """Intransitive (+PP), transitive + object (+PP), or ditransitive + object + to + recipient."""
        r = self.rng.random()
        if r < 0.3:
            lemma = self.rng.choice(INTRANSITIVE)
            return [verb_form(lemma, tense, subj.agr)] + (self.pp() if self.p(0.3) else [])
        if r < 0.85:
            lemma = self.rng.choice(TRANSITIVE)
            words = [verb_form(lemma, tense, subj.agr)] + self.obj(lemma, subj, refl, nested)
            return words + (self.pp() if self.p(0.1) else [])
        lemma = self.rng.choice(DITRANSITIVE)
        recipient = (self.name(avoid=subj.words) if self.p(0.5) else self.det_np(ANIMATE)).words
        return [verb_form(lemma, tense, subj.agr)] + self.det_np(("thing", "food")).words + ["to"] + recipient

    def sentence(self):
        """(words, final punctuation): statements, questions and imperatives."""
        r, tense = self.rng.random(), self.tense()
        if r < 0.5:  # statement
            if self.p(0.25):
                subj = self.subject(kinds=OBJECT_KINDS["any"])
                return subj.words + [COPULA[tense, subj.agr]] + self.predicate(subj), "."
            subj = self.subject()
            return subj.words + self.vp(subj, tense), "."
        if r < 0.6:  # yes/no question with do-support: the verb goes to its base form
            subj = self.subject()
            return [DO[tense, subj.agr]] + subj.words + self.vp(subj, "base"), "?"
        if r < 0.7:  # yes/no question with the copula fronted from the main clause
            subj = self.subject(kinds=OBJECT_KINDS["any"], rc=0.15)
            return [COPULA[tense, subj.agr]] + subj.words + self.predicate(subj), "?"
        if r < 0.76:  # what-question: the object is the gap
            subj = self.subject()
            lemma = self.rng.choice([v for v in TRANSITIVE if VERBS[v].obj in ("any", "thing", "food")])
            return ["what", DO[tense, subj.agr]] + subj.words + [lemma], "?"
        if r < 0.8:  # who-question: the subject is the gap
            who = NP([], "3sg", None, None, True)
            return ["who"] + self.vp(who, tense, refl=False), "?"
        if r < 0.86:  # where-question
            if self.p(0.5):
                subj = self.subject(kinds=OBJECT_KINDS["any"], pp=0.0, rc=0.0)
                return ["where", COPULA[tense, subj.agr]] + subj.words, "?"
            subj = self.subject(pp=0.0, rc=0.0)
            return ["where", DO[tense, subj.agr]] + subj.words + [self.rng.choice(INTRANSITIVE)], "?"
        you = NP([], "pl", "yourself", "you", True)  # imperative: the understood subject is "you"
        words = ["be", self.rng.choice(sorted(ADJECTIVES))] if self.p(0.08) else self.vp(you, "base")
        return (["please"] if self.p(0.15) else []) + words, "!" if self.p(0.4) else "."


def render(words, punct):
    """["the", "dog", "sleeps"], "." -> "The dog sleeps." (names and "I" keep their capitals)."""
    first = words[0][0].upper() + words[0][1:]
    return " ".join([first] + words[1:]) + punct


def synthetic_corpus(n_words, seed=0):
    """Documents (one sentence per line, 4-16 sentences) with at least n_words words in all; same seed, same text."""
    rng, docs, total = random.Random(seed), [], 0
    while total < n_words:
        grammar = _Grammar(rng)
        doc = "\n".join(render(*grammar.sentence()) for _ in range(rng.randint(4, 16)))
        docs.append(doc)
        total += len(doc.split())
    return docs


# -----------------------------------------------------------------------------
# Minimal pairs: a grammatical sentence of the grammar and a copy broken in one place

PHENOMENA = {  # UID -> BLiMP field
    "subject_verb_agreement": "morphology",
    "agreement_across_prepositional_phrase": "morphology",
    "determiner_noun_agreement": "morphology",
    "irregular_past_tense": "morphology",
    "anaphor_agreement": "morphology",
    "argument_structure": "syntax",
    "question_formation": "syntax",
}
_WRONG_NUMBER = {"is": "are", "are": "is", "am": "is", "was": "were", "were": "was"}
_DET_FLIP = {"this": "these", "these": "this", "that": "those", "those": "that"}


def _pair(g, phenomenon):
    """-> (good words, bad words, punctuation) for one phenomenon, built from the grammar's productions."""
    rng, tense = g.rng, g.tense()
    plain = dict(pp=0.0, rc=0.0)

    # -> (good verb, wrongly agreeing verb, rest of the VP); a past lexical verb does not agree, so it is present
    def agreeing_verb(subj, tense):
        if g.p(0.3):
            good = COPULA[tense, subj.agr]
            return good, _WRONG_NUMBER[good], g.predicate(subj)
        lemma = rng.choice(TRANSITIVE + INTRANSITIVE)
        good = verb_form(lemma, "present", subj.agr)
        bad = VERBS[lemma].s3 if good == lemma else lemma
        rest = g.obj(lemma, subj, refl=False) if lemma in TRANSITIVE else []
        return good, bad, rest

    if phenomenon == "subject_verb_agreement":
        subj = g.subject(**plain)
        good, bad, rest = agreeing_verb(subj, tense)
        return subj.words + [good] + rest, subj.words + [bad] + rest, "."
    if phenomenon == "agreement_across_prepositional_phrase":
        number = rng.choice(["sg", "pl"])
        subj = g.det_np(ANIMATE, number=number, adj=0.0)  # the noun in the PP has the other number: an attractor
        words = subj.words + g.pp(number="pl" if number == "sg" else "sg")
        good, bad, rest = agreeing_verb(subj, tense)
        return words + [good] + rest, words + [bad] + rest, "."
    if phenomenon == "determiner_noun_agreement":
        subj = g.subject(**plain)
        lemma = rng.choice(TRANSITIVE)
        det = rng.choice(sorted(_DET_FLIP))
        obj = g.det_np(OBJECT_KINDS[VERBS[lemma].obj], number=DETERMINERS[det], det=det).words
        words = subj.words + [verb_form(lemma, tense, subj.agr)]
        return words + obj, words + [_DET_FLIP[det]] + obj[1:], "."
    if phenomenon == "irregular_past_tense":
        subj = g.subject(**plain)
        lemma = rng.choice(IRREGULAR)
        if "intr" in VERBS[lemma].frames:
            rest = g.pp() if g.p(0.4) else []
        elif "tr" in VERBS[lemma].frames:
            rest = g.obj(lemma, subj, refl=False)
        else:
            rest = g.det_np(("thing", "food")).words + ["to"] + g.name(avoid=subj.words).words
        return subj.words + [VERBS[lemma].past] + rest, subj.words + [overregularize(lemma)] + rest, "."
    if phenomenon == "anaphor_agreement":
        if g.p(0.25):
            w = rng.choice(["he", "she", "they"])
            subj = NP([w], PRONOUNS[w][2], PRONOUNS[w][1], w, True)
        else:
            subj = g.name() if g.p(0.4) else g.det_np(ANIMATE)
        lemma = rng.choice([v for v in TRANSITIVE if VERBS[v].refl])
        # a wrong reflexive that is wrong in any reading: pets may be "he" or "she", so those differ in number
        wrong = {"himself": ["herself", "themselves"], "herself": ["himself", "themselves"],
                 "itself": ["themselves"], "themselves": ["himself", "herself", "itself"]}[subj.refl]
        words = subj.words + [verb_form(lemma, tense, subj.agr)]
        return words + [subj.refl], words + [rng.choice(wrong)], "."
    if phenomenon == "argument_structure":
        subj = g.subject(**plain)
        lemma = rng.choice([v for v in TRANSITIVE if "ditr" not in VERBS[v].frames])
        # sit and wait have transitive uses ("sit the baby down", "wait tables"): not used as the bad verb
        bad_lemma = rng.choice([v for v in INTRANSITIVE if v not in ("sit", "wait")])
        obj = g.obj(lemma, subj, refl=False)
        return (subj.words + [verb_form(lemma, tense, subj.agr)] + obj,
                subj.words + [verb_form(bad_lemma, tense, subj.agr)] + obj, ".")
    if phenomenon == "question_formation":
        # "the dog that is big is happy": the question fronts the main-clause copula, not the first one
        head = g.det_np(OBJECT_KINDS["any"], adj=0.0)
        aux1, aux2 = COPULA[g.tense(), head.agr], COPULA[tense, head.agr]
        pred1 = g.predicate(head)
        pred2 = [rng.choice([a for a, k in ADJECTIVES.items() if (head.animate or k == "any") and [a] != pred1])]
        good = [aux2] + head.words + ["that", aux1] + pred1 + pred2
        bad = [aux1] + head.words + ["that"] + pred1 + [aux2] + pred2
        return good, bad, "?"
    raise ValueError(f"unknown phenomenon {phenomenon!r}; expected one of {sorted(PHENOMENA)}")


def synthetic_minimal_pairs(n_per_phenomenon=1000, seed=0):
    """BLiMP-format pairs (sentence_good, sentence_bad, UID = phenomenon, field, ...), distinct within a phenomenon."""
    rng, pairs = random.Random(seed), []
    for uid, field in PHENOMENA.items():
        seen, tries = set(), 0
        while len(seen) < n_per_phenomenon:
            tries += 1
            if tries > 50 * n_per_phenomenon + 1000:
                raise ValueError(f"the grammar has fewer than n_per_phenomenon={n_per_phenomenon} distinct {uid} pairs")
            good, bad, punct = _pair(_Grammar(rng, topical=False), uid)
            pair = (render(good, punct), render(bad, punct))
            if pair in seen:
                continue
            seen.add(pair)
            pairs.append({"sentence_good": pair[0], "sentence_bad": pair[1], "field": field,
                          "linguistics_term": uid, "UID": uid, "pairID": str(len(seen) - 1),
                          "simple_LM_method": True, "one_prefix_method": False, "two_prefix_method": False,
                          "lexically_identical": sorted(good) == sorted(bad)})
    return pairs
