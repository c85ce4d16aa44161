"""A seeded synthetic multi-document QA set: invented people, towns and companies, one entity per
chunk, the facts a question needs spread over one or two chunks among distractor chunks about
other entities, every chunk padded with plausible filler to a set length.

Options (as `synthetic:n=60,chunks=6,chunk_words=90,seed=0`): `n` examples, `chunks` per example
(≥ 2), `chunk_words` words per chunk (≥ 30), `seed`. Questions are single-hop ("In which year
was X founded?") or two-hop ("In which town was the founder of X born?"); answers are short
strings that occur verbatim in a chunk. With the defaults a prompt is ≥ 600 SmolLM2 tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from eval.examples import Example

_FIRST = ["Ada", "Bram", "Cora", "Dov", "Elin", "Fenna", "Gus", "Hedda", "Ivo", "Jora", "Kasper", "Lise",
          "Mads", "Nora", "Otto", "Petra", "Quill", "Runa", "Sten", "Tove", "Ulla", "Vidar", "Wren", "Yrsa"]
_SURNAME = (["Ash", "Brenn", "Cald", "Dorn", "Eke", "Frost", "Gale", "Holm", "Isk", "Jarl", "Kest", "Lund",
             "Mor", "Nyl", "Orm", "Pell", "Rask", "Sarn", "Torv", "Vang"],
            ["rel", "wick", "strand", "berg", "hollow", "mark", "ley", "vik", "stead", "gard"])
_TOWN = (["Ash", "Bel", "Cor", "Dun", "Ell", "Fen", "Gar", "Hal", "Ister", "Kel", "Lorn", "Mar", "Nor",
          "Orr", "Quen", "Ros", "Sel", "Tarn", "Ulm", "Vell", "Wex", "Yar", "Zell", "Brin"],
         ["by", "ford", "mere", "wick", "holt", "haven", "dale", "moor", "ton", "brook", "field", "port"])
_COMPANY = ["Brantley", "Corvel", "Dravik", "Elsmore", "Fairholt", "Grennick", "Hallow", "Ivarsen",
            "Jessop", "Karrow", "Lindqvist", "Morrow", "Netherby", "Oakhurst", "Pryce", "Quarrel",
            "Redfern", "Stromby", "Tallis", "Umber", "Varga", "Westergaard"]
_TRADES = {"Optics": "lenses for ship telescopes", "Textiles": "heavy wool cloth",
           "Foundry": "cast iron stoves", "Instruments": "barometers and tide clocks",
           "Ceramics": "glazed roof tiles", "Milling": "rye and barley flour",
           "Shipping": "coastal freight services", "Paperworks": "ledger paper and envelopes"}
_RIVERS = ["Aller", "Brede", "Colne", "Derwen", "Esk", "Fyle", "Glass", "Hodder", "Isla", "Kennet",
           "Lune", "Mease", "Nidd", "Ouse", "Perle", "Rother", "Skell", "Tamar", "Usk", "Wenning"]
_JOBS = ["engineer", "chemist", "surveyor", "bookbinder", "watchmaker", "ship designer", "printer",
         "glassblower", "architect", "botanist"]

_FILLER = {
    "company": [
        "{name} publishes a short annual report that few people outside the trade ever read.",
        "Former employees of {name} describe the workshops as careful, quiet and unhurried.",
        "Over the decades {name} has changed its logo several times without much public notice.",
        "The archive of {name} holds boxes of letters, price lists and faded photographs.",
        "Visitors to {name} are shown the older machines, which are still oiled every week.",
        "Trade journals have praised the steady quality of the goods made by {name}.",
        "{name} has never been listed on a stock exchange and remains privately owned.",
        "Apprentices at {name} spend their first year learning to keep tools in order.",
        "A small display about the history of {name} stands in the entrance hall.",
        "During hard winters {name} kept its staff on full wages, which is still remembered.",
        "Several rival firms tried to copy the methods of {name}, with little success.",
        "The managers of {name} meet every Monday morning to plan the week.",
    ],
    "person": [
        "Friends remembered {name} as patient, curious and fond of long walks by the water.",
        "{name} kept detailed notebooks, many of which survive in a regional archive.",
        "Colleagues said that {name} rarely raised a voice, even in difficult meetings.",
        "In later years {name} gave evening lectures that drew surprisingly large crowds.",
        "Letters written by {name} show a dry sense of humour and a love of precise detail.",
        "{name} was an early riser who liked to work before the rest of the house was awake.",
        "A portrait of {name} hangs in a meeting room, slightly crooked, as visitors often note.",
        "Students who trained with {name} went on to work in many different trades.",
        "{name} collected old maps and spent holidays walking the routes they showed.",
        "The diaries of {name} mention the weather on almost every page.",
        "Neighbours recalled that {name} grew vegetables and gave most of them away.",
        "{name} disliked travelling by sea and avoided it whenever possible.",
    ],
    "town": [
        "The market square of {name} fills with stalls every Saturday morning.",
        "Narrow lanes in the old quarter of {name} still follow their medieval lines.",
        "{name} has a small library whose reading room overlooks a walled garden.",
        "Many families in {name} have lived there for several generations.",
        "Every spring {name} holds a fair with music, dancing and a cattle show.",
        "The railway station of {name} was rebuilt after a fire destroyed the first one.",
        "Walkers come to {name} for the paths that lead up into the surrounding hills.",
        "The parish church of {name} is known for its carved wooden pulpit.",
        "Fog often settles over {name} on autumn mornings and lifts by noon.",
        "Shops in {name} close early on Wednesdays, an old custom that has survived.",
        "{name} twinned with a town across the sea, and school exchanges followed.",
        "The town council of {name} meets in a hall built of grey local stone.",
    ],
}

_QUESTIONS = {  # kind → (question template, needed entities); answers are attributes
    "company_year": "In which year was {company} founded?",
    "company_founder": "Who founded {company}?",
    "company_town": "In which town is {company} based?",
    "person_town": "In which town was {person} born?",
    "founder_town": "In which town was the founder of {company} born?",
    "founder_year": "In which year was the founder of {company} born?",
    "hq_river": "On which river lies the town where {company} is based?",
}


@dataclass
class _World:
    rng: random.Random
    used: set[str]

    def unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("ran out of invented names")

    def person(self) -> dict:
        r = self.rng
        name = self.unique(lambda: f"{r.choice(_FIRST)} {r.choice(_SURNAME[0])}{r.choice(_SURNAME[1])}")
        return {"kind": "person", "name": name, "year": str(r.randint(1820, 1950)), "town": self.town()["name"],
                "job": r.choice(_JOBS)}

    def town(self) -> dict:
        r = self.rng
        name = self.unique(lambda: r.choice(_TOWN[0]) + r.choice(_TOWN[1]))
        return {"kind": "town", "name": name, "river": r.choice(_RIVERS),
                "year": str(r.randint(900, 1700))}

    def company(self, founder: dict | None = None, town: dict | None = None) -> dict:
        r = self.rng
        trade = r.choice(sorted(_TRADES))
        name = self.unique(lambda: f"{r.choice(_COMPANY)} {trade}")
        founder = founder or self.person()
        return {"kind": "company", "name": name, "product": _TRADES[trade], "founder": founder["name"],
                "year": str(max(int(founder["year"]) + 22, r.randint(1850, 1990))),
                "town": (town or self.town())["name"]}


def _facts(e: dict) -> list[str]:
    if e["kind"] == "company":
        return [f"{e['name']} was founded in {e['year']} by {e['founder']}.",
                f"{e['name']} is based in the town of {e['town']}, where it makes {e['product']}."]
    if e["kind"] == "person":
        return [f"{e['name']} was born in {e['year']} in the town of {e['town']}.",
                f"{e['name']} worked as a {e['job']} for most of a long career."]
    return [f"The town of {e['name']} lies on the {e['river']} River.",
            f"{e['name']} received its first charter in {e['year']}."]


def _chunk(e: dict, words: int, rng: random.Random) -> str:
    facts = _facts(e)
    pool = [s.format(name=e["name"]) for s in _FILLER[e["kind"]]]
    rng.shuffle(pool)
    sentences, n = [], sum(len(f.split()) for f in facts)
    while n < words:  # cycles through the pool again only for very long chunks
        sentences.append(pool[len(sentences) % len(pool)])
        n += len(sentences[-1].split())
    for fact in facts:  # facts land anywhere in the chunk, not always first
        sentences.insert(rng.randint(0, len(sentences)), fact)
    return " ".join(sentences)


def _make(rng: random.Random, kind: str, n_chunks: int, words: int) -> tuple[str, str, list[str]]:
    w = _World(rng, set())
    founder, town = w.person(), w.town()
    company = w.company(founder, town)
    answer = {"company_year": company["year"], "company_founder": founder["name"],
              "company_town": town["name"], "person_town": founder["town"],
              "founder_town": founder["town"], "founder_year": founder["year"], "hq_river": town["river"]}[kind]
    needed = {"company_year": [company], "company_founder": [company], "company_town": [company],
              "person_town": [founder], "founder_town": [company, founder],
              "founder_year": [company, founder], "hq_river": [company, town]}[kind]
    makers = [w.person, w.town, w.company]
    entities = needed + [rng.choice(makers)() for _ in range(n_chunks - len(needed))]
    rng.shuffle(entities)
    question = _QUESTIONS[kind].format(company=company["name"], person=founder["name"])
    return question, answer, [_chunk(e, words, rng) for e in entities]


OPTIONS = ("n", "chunks", "chunk_words", "seed")


def generate(n: int = 60, chunks: int = 6, chunk_words: int = 90, seed: int = 0) -> list[Example]:
    if n < 1 or chunks < 2 or chunk_words < 30:
        raise ValueError("synthetic needs n ≥ 1, chunks ≥ 2 (two-hop facts span two) and chunk_words ≥ 30")
    kinds = sorted(_QUESTIONS)
    out = []
    for i in range(n):
        rng = random.Random(f"ragblend-synthetic:{seed}:{i}")  # str seeds hash the same in every process
        kind = kinds[i % len(kinds)]
        question, answer, texts = _make(rng, kind, chunks, chunk_words)
        out.append(Example(f"synthetic-{seed}-{i}-{kind}", question, [answer], texts))
    return out
