"""A broad free-answer corpus: 26 categories of cloze facts, split once into calibration and test.

The six categories of the first corpus (generate.py) were too narrow for exit rules that must hold
on what people ask; these add arithmetic, sequences, word forms, and facts about countries, in the
shared set's format (`{"id", "prompt", "answer", "category"}`, the answer with its leading space).
Every fact is made from a table or a rule in this file, so each answer can be checked by reading it.

The split is by fact and fixed (a hash of the prompt): `cloze-broad-test.jsonl` is the test
split, which no calibration, threshold or choice of ours may see; `cloze-broad.jsonl` is for
calibration. Facts of the earlier corpora (which the shipped heads were calibrated on) are never
test facts. Few-shot prefixes of test prompts come from the test split itself.

    python -m edge_spade.convert.cloze.broad   # rewrites both files, none of the shared set's prompts
    python -m edge_spade.convert.cloze.broad --per-category 120 > broad-capped.jsonl   # what heads saw
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from .generate import CAPITALS, COLOURS, OPPOSITES, PLURALS, SEQUENCES

TEST_SHARE = 0.2
HERE = Path(__file__).resolve().parent

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
ORDINALS = [
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
    "thirteenth",
    "fourteenth",
    "fifteenth",
    "sixteenth",
    "seventeenth",
    "eighteenth",
    "nineteenth",
    "twentieth",
]
PAST = {
    "walk": "walked",
    "jump": "jumped",
    "play": "played",
    "talk": "talked",
    "open": "opened",
    "close": "closed",
    "cook": "cooked",
    "clean": "cleaned",
    "call": "called",
    "help": "helped",
    "watch": "watched",
    "listen": "listened",
    "wait": "waited",
    "start": "started",
    "work": "worked",
    "go": "went",
    "see": "saw",
    "eat": "ate",
    "drink": "drank",
    "run": "ran",
    "swim": "swam",
    "sing": "sang",
    "write": "wrote",
    "read": "read",
    "take": "took",
    "give": "gave",
    "come": "came",
    "make": "made",
    "know": "knew",
    "think": "thought",
    "buy": "bought",
    "bring": "brought",
    "teach": "taught",
    "catch": "caught",
    "fly": "flew",
    "drive": "drove",
    "ride": "rode",
    "speak": "spoke",
    "break": "broke",
    "choose": "chose",
    "forget": "forgot",
    "begin": "began",
    "sleep": "slept",
    "keep": "kept",
    "feel": "felt",
    "leave": "left",
    "meet": "met",
    "send": "sent",
    "spend": "spent",
    "build": "built",
    "sit": "sat",
    "stand": "stood",
    "win": "won",
    "lose": "lost",
    "tell": "told",
    "sell": "sold",
    "find": "found",
    "hold": "held",
    "fall": "fell",
    "grow": "grew",
    "draw": "drew",
    "throw": "threw",
}
COMPARATIVES = {
    "big": "bigger",
    "small": "smaller",
    "tall": "taller",
    "short": "shorter",
    "long": "longer",
    "fast": "faster",
    "slow": "slower",
    "old": "older",
    "young": "younger",
    "hot": "hotter",
    "cold": "colder",
    "warm": "warmer",
    "strong": "stronger",
    "weak": "weaker",
    "rich": "richer",
    "poor": "poorer",
    "high": "higher",
    "low": "lower",
    "deep": "deeper",
    "wide": "wider",
    "good": "better",
    "bad": "worse",
    "far": "farther",
    "happy": "happier",
    "easy": "easier",
    "heavy": "heavier",
    "early": "earlier",
    "busy": "busier",
    "funny": "funnier",
    "dry": "drier",
    "cheap": "cheaper",
    "clean": "cleaner",
    "dark": "darker",
    "hard": "harder",
    "soft": "softer",
    "loud": "louder",
    "quiet": "quieter",
    "near": "nearer",
    "thick": "thicker",
    "thin": "thinner",
}
ING = {
    "run": "running",
    "swim": "swimming",
    "sit": "sitting",
    "stop": "stopping",
    "cut": "cutting",
    "get": "getting",
    "put": "putting",
    "begin": "beginning",
    "make": "making",
    "write": "writing",
    "ride": "riding",
    "drive": "driving",
    "come": "coming",
    "take": "taking",
    "dance": "dancing",
    "smile": "smiling",
    "walk": "walking",
    "play": "playing",
    "read": "reading",
    "eat": "eating",
    "sleep": "sleeping",
    "sing": "singing",
    "jump": "jumping",
    "cook": "cooking",
    "talk": "talking",
    "work": "working",
    "fly": "flying",
    "cry": "crying",
    "study": "studying",
    "see": "seeing",
    "go": "going",
    "do": "doing",
    "lie": "lying",
    "die": "dying",
    "tie": "tying",
    "win": "winning",
    "shop": "shopping",
    "plan": "planning",
    "travel": "traveling",
    "open": "opening",
}
LANGUAGES = {
    "France": "French",
    "Germany": "German",
    "Spain": "Spanish",
    "Italy": "Italian",
    "Portugal": "Portuguese",
    "Russia": "Russian",
    "Japan": "Japanese",
    "China": "Chinese",
    "Greece": "Greek",
    "Turkey": "Turkish",
    "Poland": "Polish",
    "Sweden": "Swedish",
    "Norway": "Norwegian",
    "Denmark": "Danish",
    "Finland": "Finnish",
    "the Netherlands": "Dutch",
    "Hungary": "Hungarian",
    "Korea": "Korean",
    "Vietnam": "Vietnamese",
    "Thailand": "Thai",
    "Brazil": "Portuguese",
    "Mexico": "Spanish",
    "Argentina": "Spanish",
    "Iran": "Persian",
    "Israel": "Hebrew",
    "Ukraine": "Ukrainian",
    "Romania": "Romanian",
    "the Czech Republic": "Czech",
    "Egypt": "Arabic",
    "Saudi Arabia": "Arabic",
    "Indonesia": "Indonesian",
    "Iceland": "Icelandic",
    "Austria": "German",
    "Chile": "Spanish",
    "Peru": "Spanish",
    "Cuba": "Spanish",
    "England": "English",
    "Australia": "English",
}
DEMONYMS = {
    "France": "French",
    "Germany": "German",
    "Italy": "Italian",
    "Spain": "Spanish",
    "Japan": "Japanese",
    "China": "Chinese",
    "Canada": "Canadian",
    "Mexico": "Mexican",
    "Brazil": "Brazilian",
    "India": "Indian",
    "Russia": "Russian",
    "Egypt": "Egyptian",
    "Kenya": "Kenyan",
    "Peru": "Peruvian",
    "Chile": "Chilean",
    "Norway": "Norwegian",
    "Sweden": "Swedish",
    "Poland": "Polish",
    "Greece": "Greek",
    "Turkey": "Turkish",
    "Ireland": "Irish",
    "Scotland": "Scottish",
    "Wales": "Welsh",
    "England": "English",
    "Australia": "Australian",
    "Argentina": "Argentine",
    "Portugal": "Portuguese",
    "Austria": "Austrian",
    "Belgium": "Belgian",
    "Switzerland": "Swiss",
    "Cuba": "Cuban",
    "Vietnam": "Vietnamese",
    "Thailand": "Thai",
    "Ukraine": "Ukrainian",
    "Morocco": "Moroccan",
    "Nigeria": "Nigerian",
}
CURRENCIES = {
    "Japan": "yen",
    "the United Kingdom": "pound",
    "the United States": "dollar",
    "India": "rupee",
    "China": "yuan",
    "Russia": "ruble",
    "Mexico": "peso",
    "Switzerland": "franc",
    "South Korea": "won",
    "Brazil": "real",
    "Poland": "zloty",
    "Sweden": "krona",
    "Turkey": "lira",
    "Thailand": "baht",
    "South Africa": "rand",
    "Israel": "shekel",
    "Vietnam": "dong",
    "Canada": "dollar",
    "Australia": "dollar",
    "Germany": "euro",
    "France": "euro",
    "Italy": "euro",
    "Spain": "euro",
}
CONTINENTS = {
    "Africa": [
        "Kenya",
        "Egypt",
        "Nigeria",
        "Ghana",
        "Morocco",
        "Ethiopia",
        "Senegal",
        "Uganda",
        "Angola",
        "Zambia",
        "Mali",
        "Sudan",
        "Algeria",
        "Tunisia",
        "Somalia",
        "Namibia",
        "Botswana",
    ],
    "Europe": [
        "France",
        "Germany",
        "Italy",
        "Spain",
        "Poland",
        "Sweden",
        "Norway",
        "Austria",
        "Greece",
        "Portugal",
        "Ireland",
        "Belgium",
        "Hungary",
        "Finland",
        "Denmark",
        "Croatia",
        "Romania",
    ],
    "Asia": [
        "Japan",
        "China",
        "India",
        "Vietnam",
        "Thailand",
        "Nepal",
        "Pakistan",
        "Mongolia",
        "Malaysia",
        "Indonesia",
        "Bangladesh",
        "Cambodia",
        "Laos",
        "Korea",
        "Uzbekistan",
        "Kazakhstan",
    ],
    "South America": [
        "Brazil",
        "Argentina",
        "Chile",
        "Peru",
        "Colombia",
        "Venezuela",
        "Ecuador",
        "Bolivia",
        "Uruguay",
        "Paraguay",
    ],
    "North America": ["Canada", "Mexico", "the United States"],
}
SYMBOLS = {
    "gold": "Au",
    "silver": "Ag",
    "iron": "Fe",
    "copper": "Cu",
    "oxygen": "O",
    "hydrogen": "H",
    "carbon": "C",
    "nitrogen": "N",
    "sodium": "Na",
    "potassium": "K",
    "lead": "Pb",
    "tin": "Sn",
    "helium": "He",
    "neon": "Ne",
    "calcium": "Ca",
    "zinc": "Zn",
    "sulfur": "S",
    "mercury": "Hg",
    "chlorine": "Cl",
    "uranium": "U",
    "magnesium": "Mg",
    "aluminum": "Al",
    "silicon": "Si",
    "nickel": "Ni",
}
YOUNG = {
    "dog": "puppy",
    "cat": "kitten",
    "cow": "calf",
    "horse": "foal",
    "sheep": "lamb",
    "goat": "kid",
    "pig": "piglet",
    "duck": "duckling",
    "frog": "tadpole",
    "bear": "cub",
    "lion": "cub",
    "deer": "fawn",
    "goose": "gosling",
    "kangaroo": "joey",
    "swan": "cygnet",
    "owl": "owlet",
    "hen": "chick",
    "eagle": "eaglet",
}
ROMAN = {
    1: "I",
    2: "II",
    3: "III",
    4: "IV",
    5: "V",
    6: "VI",
    7: "VII",
    8: "VIII",
    9: "IX",
    10: "X",
    11: "XI",
    12: "XII",
    20: "XX",
    40: "XL",
    50: "L",
    90: "XC",
    100: "C",
    500: "D",
    1000: "M",
}
SIDES = {
    "triangle": "three",
    "square": "four",
    "rectangle": "four",
    "pentagon": "five",
    "hexagon": "six",
    "heptagon": "seven",
    "octagon": "eight",
    "nonagon": "nine",
    "decagon": "ten",
}


def _facts() -> Iterator[tuple[str, str, str]]:
    """(category, prompt, answer without its leading space), every category in turn."""
    for country, city in CAPITALS.items():
        yield "capital", f"The capital of {country} is", city
        yield "capital_of", f"{city} is the capital of", country
    for a in range(0, 31):
        for b in range(0, 31):
            if a + b <= 40:
                yield "addition", f"{a} + {b} =", str(a + b)
    for a in range(1, 31):
        for b in range(0, a + 1):
            yield "subtraction", f"{a} - {b} =", str(a - b)
    for a in range(2, 13):
        for b in range(2, 13):
            yield "multiplication", f"{a} x {b} =", str(a * b)
    for a in range(1, 51):
        yield "doubling", f"Double {a} is", str(2 * a)
    for word, opposite in OPPOSITES.items():
        yield "opposite", f"The opposite of {word} is", opposite
    for i in range(7):
        yield "weekday", f"{WEEKDAYS[i]}, {WEEKDAYS[(i + 1) % 7]}, {WEEKDAYS[(i + 2) % 7]},", WEEKDAYS[(i + 3) % 7]
        yield "weekday", f"The day after {WEEKDAYS[i]} is", WEEKDAYS[(i + 1) % 7]
        yield "weekday", f"The day before {WEEKDAYS[(i + 1) % 7]} is", WEEKDAYS[i]
    for i in range(12):
        yield "month", f"{MONTHS[i]}, {MONTHS[(i + 1) % 12]}, {MONTHS[(i + 2) % 12]},", MONTHS[(i + 3) % 12]
        yield "month", f"The month after {MONTHS[i]} is", MONTHS[(i + 1) % 12]
        yield "month", f"The month before {MONTHS[(i + 1) % 12]} is", MONTHS[i]
    for step in (1, 2, 3, 5, 10):
        for start in range(1, 41):
            yield "counting", ", ".join(str(start + step * k) for k in range(3)) + ",", str(start + 3 * step)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(23):
        yield "alphabet", f"{letters[i]}, {letters[i + 1]}, {letters[i + 2]},", letters[i + 3]
        yield "alphabet", f"The letter after {letters[i + 2]} is", letters[i + 3]
    for prompt, color in COLOURS.items():
        yield "color", prompt, color
    for prompt, following in SEQUENCES.items():
        yield "sequence", prompt, following
    for one, many in PLURALS.items():
        yield "plural", f"One {one}, two", many
    for verb, past in PAST.items():
        yield "past_tense", f"Today I {verb}; yesterday I", past
    for adjective, comparative in COMPARATIVES.items():
        yield "comparative", f"The comparative of {adjective} is", comparative
    for verb, form in ING.items():
        yield "ing_form", f"The -ing form of {verb} is", form
    for n in range(1, 21):
        yield "number_word", f"The number {n} in words is", NUMBER_WORDS[n]
        yield "number_word", f"The number after {NUMBER_WORDS[n - 1]} is", NUMBER_WORDS[n]
        yield "ordinal", f"The ordinal form of {NUMBER_WORDS[n]} is", ORDINALS[n - 1]
    for country, language in LANGUAGES.items():
        yield "language", f"The main language of {country} is", language
    for country, demonym in DEMONYMS.items():
        yield "demonym", f"A person from {country} is", demonym
    for country, currency in CURRENCIES.items():
        yield "currency", f"The currency of {country} is the", currency
    for continent, countries in CONTINENTS.items():
        for country in countries:
            yield "continent", f"{country} is a country in", continent
    for element, symbol in SYMBOLS.items():
        yield "chemical_symbol", f"The chemical symbol for {element} is", symbol
    for animal, young in YOUNG.items():
        yield "animal_young", f"A baby {animal} is called a", young
    for n, numeral in ROMAN.items():
        yield "roman_numeral", f"The Roman numeral for {n} is", numeral
    for shape, sides in SIDES.items():
        yield "shape_sides", f"The number of sides of a {shape} is", sides


def calibrated_before() -> set[str]:
    """Prompts of the earlier corpora, which shipped heads were calibrated on: never test facts."""
    return {
        json.loads(line)["prompt"]
        for name in ("cloze-calibration.jsonl", "cloze-calibration-v1.jsonl")
        for line in (HERE / name).read_text().splitlines()
        if line.strip()
    }


def in_test_split(prompt: str, calibrated: set[str]) -> bool:
    """The fixed split: a fact no calibration has seen is a test fact when the hash of its prompt
    falls in TEST_SHARE."""
    return prompt not in calibrated and int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 16**8 < TEST_SHARE


def facts() -> list[dict]:
    """Every fact once (the first of repeated prompts), in category order."""
    rows, seen = [], set()
    for category, prompt, answer in _facts():
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"id": f"{category}-{len(rows)}", "prompt": prompt, "answer": " " + answer, "category": category})
    return rows


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def excluded_hashes() -> set[str]:
    """Hashes of the shared benchmark set's prompts (`shared-prompts.sha256`, written once from
    ../shared/data/cloze/facts.jsonl), so the corpus leaves them out without that file at hand."""
    return set((HERE / "shared-prompts.sha256").read_text().split())


def write(folder: Path = HERE) -> tuple[Path, Path]:
    """cloze-broad.jsonl (calibration) and cloze-broad-test.jsonl (test) in `folder`."""
    excluded = excluded_hashes()
    rows = [r for r in facts() if prompt_hash(r["prompt"]) not in excluded]
    seen = calibrated_before()
    out = folder / "cloze-broad.jsonl", folder / "cloze-broad-test.jsonl"
    for path, test in zip(out, (False, True)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if in_test_split(r["prompt"], seen) == test))
    return out


def per_category(n: int, path: Path = HERE / "cloze-broad.jsonl") -> str:
    """The first `n` calibration facts of each category, as JSONL: what the shipped free heads were
    calibrated on (arithmetic alone is over half of the corpus; capped, no category dominates)."""
    kept: dict[str, int] = {}
    out = []
    for line in path.read_text().splitlines(keepends=True):
        category = json.loads(line)["category"]
        kept[category] = kept.get(category, 0) + 1
        if kept[category] <= n:
            out.append(line)
    return "".join(out)


USAGE = "usage: python -m edge_spade.convert.cloze.broad [--per-category N > capped.jsonl]"

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--per-category" and sys.argv[2].isdigit():
        sys.stdout.write(per_category(int(sys.argv[2])))
    elif len(sys.argv) > 1:
        raise SystemExit(USAGE)
    else:
        for path in write():
            print(path)
