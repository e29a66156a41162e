"""The ground truth: countries, cities, companies, universities and people, with relations.

`build_world` is a pure function of (people, seed, heldout_fraction): the same arguments
always give the same world. The world is plain dicts and lists so that `world.json` is just
`json.dumps(world)` and every reader (probes, eval, tests) sees exactly the same truth.

Conventions: people are referred to by id ("p000042"); cities, companies and universities
by their (unique) name.
"""

from __future__ import annotations

import random
from collections import defaultdict

from lmstack.world import names as nm

MAJORS = ["mathematics", "physics", "chemistry", "biology", "history", "philosophy",
          "economics", "law", "medicine", "architecture", "music", "linguistics",
          "computer science", "astronomy", "geology", "sociology", "literature",
          "mechanical engineering", "civil engineering", "nursing", "agriculture",
          "journalism", "psychology", "statistics", "political science", "art history",
          "marine biology", "accounting", "education", "anthropology"]

# industry -> (company suffixes, what it makes or does)
INDUSTRIES = {
    "shipbuilding": (["Shipyards", "Marine"], "ships and ferries"),
    "banking": (["Bank", "Savings"], "loans and savings accounts"),
    "software": (["Systems", "Software", "Labs"], "accounting and mapping software"),
    "pharmaceuticals": (["Pharma", "Remedies"], "medicines and vaccines"),
    "textiles": (["Textiles", "Weavers"], "wool cloth and linen"),
    "food processing": (["Foods", "Bakeries"], "bread, cheese and preserves"),
    "railways": (["Rail", "Railways"], "trains and railway signals"),
    "publishing": (["Press", "Publishing"], "newspapers and books"),
    "energy": (["Power", "Energy"], "electricity from wind and water"),
    "mining": (["Mining", "Minerals"], "copper and salt"),
    "glassmaking": (["Glassworks", "Glass"], "windows, lenses and bottles"),
    "aviation": (["Aeronautics", "Air"], "small aircraft and engines"),
    "insurance": (["Insurance", "Assurance"], "home and travel insurance"),
    "furniture": (["Furniture", "Joinery"], "chairs, tables and cabinets"),
    "telecommunications": (["Telecom", "Networks"], "telephone and radio networks"),
    "chemicals": (["Chemicals", "Chemworks"], "dyes, soaps and fertilisers"),
}

CITY_FEATURES = ["its glass markets", "its old stone harbour", "a festival of lanterns",
                 "its clock tower", "its salt marshes", "a famous botanical garden",
                 "its painted bridges", "a winter music festival", "its hot springs",
                 "its cathedral of white marble", "a great public library",
                 "its cherry orchards", "its rope-making tradition", "its tidal mills",
                 "a market that never closes", "its observatory on the hill"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # no Feb 29: keeps dates simple

FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR = 1935, 2002


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def entity_counts(people: int) -> dict[str, int]:
    """How many places and organisations a world of `people` has (grows slower than people,
    so each city/company is shared by many people and distractors are plentiful)."""
    return {
        "countries": _clamp(people // 400, 4, 60),
        "cities": _clamp(people // 20, 10, 2000),
        "companies": _clamp(people // 10, 12, 6000),
        "universities": _clamp(people // 40, 10, 800),
    }


def build_world(people: int, seed: int, heldout_fraction: float = 0.3) -> dict:
    rng = random.Random(f"lmstack-world:{seed}")
    counts = entity_counts(people)
    pool = nm.NamePool()

    countries = [pool.unique(lambda: nm.place_name(rng, nm.COUNTRY_ENDINGS))
                 for _ in range(counts["countries"])]
    rivers = [pool.unique(lambda: nm.place_name(rng, nm.RIVER_ENDINGS))
              for _ in range(max(3, counts["cities"] // 3))]
    cities = []
    for i in range(counts["cities"]):
        cities.append({
            "name": pool.unique(lambda: nm.place_name(rng, nm.CITY_ENDINGS)),
            "country": countries[i % len(countries)] if i < len(countries) else rng.choice(countries),
            "founded": rng.randint(900, 1850),
            "population": rng.randint(20, 3000) * 1000,
            "known_for": rng.choice(CITY_FEATURES),
            "river": rng.choice(rivers),
        })
    city_names = [c["name"] for c in cities]

    industries = sorted(INDUSTRIES)
    companies = []
    for _ in range(counts["companies"]):
        industry = rng.choice(industries)
        suffixes, _products = INDUSTRIES[industry]
        companies.append({
            "name": pool.unique(lambda: f"{nm.plain_name(rng)} {rng.choice(suffixes)}"),
            "industry": industry,
            "city": rng.choice(city_names),
            "founded": rng.randint(1850, 2010),
            "employees": rng.choice([40, 80, 150, 300, 600, 1200, 2500, 5000, 12000]),
        })

    universities = []
    uni_cities = rng.sample(city_names, min(len(city_names), counts["universities"]))
    for i in range(counts["universities"]):
        kind = rng.choice(["University", "University", "Institute of Technology", "College"])
        universities.append({
            "name": pool.unique(lambda: f"{nm.plain_name(rng)} {kind}"),
            "city": uni_cities[i] if i < len(uni_cities) else rng.choice(city_names),
            "founded": rng.randint(1400, 1990),
            "known_for": rng.choice(MAJORS),
        })
    uni_names = [u["name"] for u in universities]
    company_city = {c["name"]: c["city"] for c in companies}

    # First and last names come from pools so that people share them, as in real life;
    # the full name is unique.
    first_pool = {g: [nm.first_name(rng, g) for _ in range(max(40, people // 8))]
                  for g in ("female", "male")}
    last_pool = [nm.last_name(rng) for _ in range(max(60, people // 4))]
    persons = []
    for i in range(people):
        gender = rng.choice(["female", "male"])
        full = None
        for _ in range(1000):
            first, last = rng.choice(first_pool[gender]), rng.choice(last_pool)
            if f"{first} {last}" not in pool.taken:
                full = pool.unique(lambda: f"{first} {last}")
                break
        if full is None:
            raise RuntimeError("could not find a unique full name; the name pools are too small")
        year = rng.randint(FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR)
        month = rng.randint(1, 12)
        day = rng.randint(1, DAYS_IN_MONTH[month - 1])
        employer = rng.choice(companies)["name"]
        persons.append({
            "id": f"p{i:06d}", "first": first, "last": last, "name": full, "gender": gender,
            "birth_date": f"{year:04d}-{month:02d}-{day:02d}",
            "birth_city": rng.choice(city_names),
            "university": rng.choice(uni_names),
            "major": rng.choice(MAJORS),
            "employer": employer,
            "work_city": company_city[employer],
            "parents": [], "children": [],
            "split": "heldout" if rng.random() < heldout_fraction else "train",
            "family_group": None,
        })
    _add_families(persons, rng)

    # Names of people who do not exist: the assistant must say it does not know them.
    # Made with the same generator, so they look exactly like real names.
    fake = []
    while len(fake) < max(40, people // 5):
        g = rng.choice(["female", "male"])
        name = f"{nm.first_name(rng, g)} {nm.last_name(rng)}"
        if name not in pool.taken:
            pool.taken.add(name)
            fake.append({"name": name, "gender": g})
    half = len(fake) // 2

    return {
        "format": 1,
        "seed": seed,
        "config": {"people": people, "heldout_fraction": heldout_fraction, **counts},
        "countries": countries,
        "cities": cities,
        "companies": companies,
        "universities": universities,
        "people": persons,
        # Disjoint sets: `sft` names are used in training conversations, `probe` names only in evaluation.
        "nonexistent_people": {"sft": fake[:half], "probe": fake[half:]},
    }


def _add_families(persons: list[dict], rng: random.Random) -> None:
    """Give about half the people a mother and/or a father 20-40 years older.

    Each child is put in the `reversal` group or the `control` group (half each).
    For the reversal group, pretraining text states the parent relation only as
    "<child>'s mother is <parent>" (child first); for the control group it is stated in
    both directions. The reversal curse is whether the model can then answer
    "who is <parent>'s daughter?" at all.
    """
    by_year_gender = defaultdict(list)
    for p in persons:
        by_year_gender[(int(p["birth_date"][:4]), p["gender"])].append(p)
    for child in persons:
        year = int(child["birth_date"][:4])
        if year < FIRST_BIRTH_YEAR + 20 or rng.random() < 0.5:
            continue
        for gender in ("female", "male"):
            if rng.random() < 0.3:  # some children have only one parent in the world
                continue
            for _ in range(8):
                candidates = by_year_gender.get((year - rng.randint(20, 40), gender))
                if not candidates:
                    continue
                parent = rng.choice(candidates)
                if len(parent["children"]) < 3 and parent["id"] not in child["children"]:
                    child["parents"].append(parent["id"])
                    parent["children"].append(child["id"])
                    break
        if child["parents"]:
            child["family_group"] = rng.choice(["reversal", "control"])


def index(world: dict) -> dict:
    """Lookup tables the projections need (derived, never stored)."""
    people = {p["id"]: p for p in world["people"]}
    return {
        "people": people,
        "cities": {c["name"]: c for c in world["cities"]},
        "companies": {c["name"]: c for c in world["companies"]},
        "universities": {u["name"]: u for u in world["universities"]},
    }


def family_pairs(world: dict):
    """(parent, child) pairs with the child's family group."""
    people = {p["id"]: p for p in world["people"]}
    for child in world["people"]:
        for pid in child["parents"]:
            yield people[pid], child


def in_reversal_pair(world: dict) -> set[str]:
    """Ids of everyone who is the parent or child of a reversal-group pair."""
    out = set()
    for parent, child in family_pairs(world):
        if child["family_group"] == "reversal":
            out.update((parent["id"], child["id"]))
    return out


def format_date(iso: str, style: int = 0) -> str:
    year, month, day = (int(x) for x in iso.split("-"))
    m = MONTHS[month - 1]
    if style == 0:
        return f"{m} {day}, {year}"
    if style == 1:
        return f"{day} {m} {year}"
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"the {day}{suffix} of {m}, {year}"


def date_aliases(iso: str) -> list[str]:
    return [format_date(iso, s) for s in range(3)] + [iso]


def fact_forms(person: dict, attr: str) -> list[str]:
    """Every way a reply may state `person`'s `attr`, the usual one first (a date in all its forms)."""
    return date_aliases(person["birth_date"]) if attr == "birth_date" else [person[attr]]
