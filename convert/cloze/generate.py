"""Free-answer calibration prompts: our own cloze facts, disjoint from ../shared/data/cloze.

Calibration needs no labels (targets come from the model), but the few-shot prefixes do, so
each fact carries its answer. Categories mirror the shared benchmark set (capitals, addition,
opposites, sequences, colours, plurals) with different facts; `write_jsonl` writes them in the
shared set's format (`{"id", "prompt", "answer", "category"}`), which `edge_spade.convert.datasets`
reads with few-shot prefixes built from other facts of the same category.

    python -m edge_spade.convert.cloze.generate   # rewrites cloze-calibration.jsonl, none of ../shared's facts
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CAPITALS = {
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Colombia": "Bogota", "Mexico": "Mexico City",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "the Netherlands": "Amsterdam",
    "Switzerland": "Bern", "the Czech Republic": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv", "Lithuania": "Vilnius", "Latvia": "Riga",
    "Estonia": "Tallinn", "Iceland": "Reykjavik", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "Morocco": "Rabat", "Tunisia": "Tunis", "Libya": "Tripoli", "Nigeria": "Abuja", "Ghana": "Accra",
    "Senegal": "Dakar", "South Korea": "Seoul", "Vietnam": "Hanoi", "the Philippines": "Manila",
    "Indonesia": "Jakarta", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad", "Afghanistan": "Kabul",
    "Saudi Arabia": "Riyadh", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "New Zealand": "Wellington", "Jamaica": "Kingston", "Qatar": "Doha",
}
CAPITALS.update({
    "Brazil": "Brasilia", "Paraguay": "Asuncion", "Panama": "Panama City", "Costa Rica": "San Jose",
    "Guatemala": "Guatemala City", "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "El Salvador": "San Salvador",
    "the Dominican Republic": "Santo Domingo", "Haiti": "Port-au-Prince", "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana", "Albania": "Tirana", "North Macedonia": "Skopje", "Bosnia and Herzegovina": "Sarajevo",
    "Montenegro": "Podgorica", "Moldova": "Chisinau", "Belarus": "Minsk", "Georgia": "Tbilisi", "Armenia": "Yerevan",
    "Azerbaijan": "Baku", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Mongolia": "Ulaanbaatar",
    "North Korea": "Pyongyang", "Taiwan": "Taipei", "Cambodia": "Phnom Penh", "Laos": "Vientiane",
    "Kuwait": "Kuwait City", "Oman": "Muscat", "Yemen": "Sanaa", "the United Arab Emirates": "Abu Dhabi",
    "Bahrain": "Manama", "Ethiopia": "Addis Ababa", "Sudan": "Khartoum", "Algeria": "Algiers", "Uganda": "Kampala",
    "Rwanda": "Kigali", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Angola": "Luanda", "Mozambique": "Maputo",
    "Namibia": "Windhoek", "Botswana": "Gaborone", "Madagascar": "Antananarivo", "Cameroon": "Yaounde",
    "Mali": "Bamako", "Niger": "Niamey", "Somalia": "Mogadishu", "Malta": "Valletta", "Cyprus": "Nicosia",
    "Luxembourg": "Luxembourg", "the United States": "Washington", "South Africa": "Pretoria", "Fiji": "Suva",
    "Papua New Guinea": "Port Moresby", "Bhutan": "Thimphu", "Tajikistan": "Dushanbe", "Kyrgyzstan": "Bishkek",
    "Turkmenistan": "Ashgabat", "Liberia": "Monrovia", "Sierra Leone": "Freetown", "Guinea": "Conakry",
    "Gabon": "Libreville", "Eritrea": "Asmara", "Malawi": "Lilongwe", "Trinidad and Tobago": "Port of Spain",
    "the Bahamas": "Nassau", "Barbados": "Bridgetown", "Belize": "Belmopan", "Guyana": "Georgetown",
    "Suriname": "Paramaribo", "Northern Ireland": "Belfast",
})
OPPOSITES = {
    "near": "far", "long": "short", "thick": "thin", "young": "old", "clean": "dirty", "cheap": "expensive",
    "loud": "quiet", "love": "hate", "win": "lose", "push": "pull", "buy": "sell", "north": "south",
    "east": "west", "summer": "winter", "heavy": "light", "first": "last", "true": "false", "alive": "dead",
    "top": "bottom", "inside": "outside", "easy": "difficult", "safe": "dangerous", "friend": "enemy",
    "sweet": "sour", "black": "white", "boy": "girl", "king": "queen", "wide": "narrow", "deep": "shallow",
    "always": "never", "before": "after", "asleep": "awake",
}
OPPOSITES.update({
    "in": "out", "on": "off", "yes": "no", "come": "go", "give": "take", "laugh": "cry", "tall": "short",
    "fat": "thin", "smooth": "rough", "question": "answer", "war": "peace", "above": "below", "over": "under",
    "more": "less", "many": "few", "positive": "negative", "sunrise": "sunset", "victory": "defeat",
    "success": "failure", "increase": "decrease", "maximum": "minimum", "major": "minor", "male": "female",
    "man": "woman", "husband": "wife", "father": "mother", "brother": "sister", "son": "daughter", "uncle": "aunt",
    "ancient": "modern", "beautiful": "ugly", "brave": "cowardly", "polite": "rude", "visible": "invisible",
    "possible": "impossible", "legal": "illegal", "entrance": "exit", "import": "export", "arrive": "depart",
    "remember": "forget", "borrow": "lend", "teacher": "student",
    "sharp": "blunt", "tight": "loose", "raw": "cooked", "private": "public", "guilty": "innocent",
    "healthy": "sick", "present": "absent", "inner": "outer", "upstairs": "downstairs", "forward": "backward",
})
SEQUENCES = {
    "Friday, Saturday, Sunday,": "Monday", "Saturday, Sunday, Monday,": "Tuesday",
    "Sunday, Monday, Tuesday,": "Wednesday", "February, March, April,": "May", "April, May, June,": "July",
    "June, July, August,": "September", "August, September, October,": "November",
    "October, November, December,": "January", "two, three, four,": "five", "four, five, six,": "seven",
    "six, seven, eight,": "nine", "eight, nine, ten,": "eleven", "2, 4, 6,": "8", "1, 2, 3,": "4",
    "10, 20, 30,": "40", "5, 10, 15,": "20", "A, B, C,": "D", "first, second, third,": "fourth",
}
SEQUENCES.update({
    "November, December, January,": "February", "December, January, February,": "March", "January, February,": "March",
    "nine, ten, eleven,": "twelve", "ten, eleven, twelve,": "thirteen", "3, 6, 9,": "12", "2, 3, 4,": "5",
    "3, 4, 5,": "6", "4, 5, 6,": "7", "5, 6, 7,": "8", "6, 7, 8,": "9", "7, 8, 9,": "10", "100, 200, 300,": "400",
    "1, 3, 5,": "7", "2, 4, 8,": "16", "B, C, D,": "E", "C, D, E,": "F", "a, b, c,": "d",
    "second, third, fourth,": "fifth", "third, fourth, fifth,": "sixth", "spring, summer, autumn,": "winter",
    "do, re, mi,": "fa", "alpha, beta, gamma,": "delta", "Mercury, Venus, Earth,": "Mars", "20, 30, 40,": "50",
})
COLOURS = {
    "A ripe tomato is": "red", "The colour of a lemon is": "yellow", "Milk is": "white", "A frog is": "green",
    "Chocolate is": "brown", "The night sky is": "black", "A carrot is": "orange", "An eggplant is": "purple",
    "A polar bear is": "white", "Ripe strawberries are": "red", "A flamingo is": "pink", "Ripe cherries are": "red",
    "The leaves of a tree in summer are": "green",
}
COLOURS.update({
    "A ripe lime is": "green", "Fire trucks are usually": "red", "A crow is": "black", "A swan is": "white",
    "The sun is": "yellow", "Clouds are": "white", "The sea is": "blue", "A pumpkin is": "orange",
    "Ravens are": "black", "Salt is": "white", "Sugar is": "white", "A school bus is": "yellow",
    "A canary is": "yellow", "Broccoli is": "green", "Cucumbers are": "green", "Ripe plums are": "purple",
    "Roses are": "red", "An emerald is": "green", "A ruby is": "red", "A sapphire is": "blue", "Ivory is": "white",
    "Charcoal is": "black", "Tree bark is": "brown", "A blueberry is": "blue", "Peas are": "green",
})
PLURALS = {
    "child": "children", "tooth": "teeth", "woman": "women", "person": "people", "ox": "oxen",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies",
    "louse": "lice", "cactus": "cacti",
}
PLURALS.update({
    "sheep": "sheep", "fish": "fish", "deer": "deer", "cat": "cats", "dog": "dogs", "house": "houses",
    "bus": "buses", "glass": "glasses", "dish": "dishes", "church": "churches", "potato": "potatoes",
    "hero": "heroes", "wife": "wives", "life": "lives", "half": "halves", "loaf": "loaves", "shelf": "shelves",
    "calf": "calves", "thief": "thieves", "story": "stories", "lady": "ladies", "party": "parties",
    "cherry": "cherries", "fox": "foxes", "watch": "watches", "bench": "benches", "apple": "apples", "book": "books",
    "car": "cars", "tree": "trees", "bird": "birds", "horse": "horses", "girl": "girls", "key": "keys",
    "toy": "toys", "die": "dice", "criterion": "criteria", "phenomenon": "phenomena", "fungus": "fungi",
    "nucleus": "nuclei", "radius": "radii",
})

# Sums under 10 that the shared set does not ask (it holds 21 of the 36 with both terms >= 1).
SMALL_SUMS = [(1, 2), (1, 5), (1, 8), (2, 1), (2, 4), (2, 7), (3, 3), (3, 6), (4, 2), (4, 5), (5, 1), (5, 4),
              (6, 3), (7, 2), (8, 1)]


def facts() -> list[dict]:
    rows: list[tuple[str, str, str]] = []
    rows += [("capital", f"The capital of {c} is", a) for c, a in CAPITALS.items()]
    rows += [("addition", f"{a} + {b} =", str(a + b)) for a in range(1, 10) for b in range(1, 10) if a + b >= 10]
    rows += [("addition", f"{a} + {b} =", str(a + b)) for a, b in SMALL_SUMS]
    rows += [("addition", f"{a} + {b} =", str(a + b)) for a in (10, 20) for b in range(1, 10)]
    rows += [("opposite", f"The opposite of {w} is", a) for w, a in OPPOSITES.items()]
    rows += [("sequence", p, a) for p, a in SEQUENCES.items()]
    rows += [("color", p, a) for p, a in COLOURS.items()]
    rows += [("plural", f"One {w}, two", a) for w, a in PLURALS.items()]
    return [{"id": f"calib-{i}", "prompt": p, "answer": " " + a, "category": c} for i, (c, p, a) in enumerate(rows)]


def write_jsonl(path: str | Path, exclude: str | Path | None = None) -> Path:
    """Write the facts; `exclude`: a cloze file (the shared benchmark set) none of them may repeat."""
    path = Path(path)
    if exclude is not None and Path(exclude).exists():
        taken = {json.loads(line)["prompt"] for line in Path(exclude).read_text().splitlines() if line.strip()}
        clash = [row["prompt"] for row in facts() if row["prompt"] in taken]
        if clash:
            raise SystemExit(f"{len(clash)} facts are also in {exclude}: {clash[:5]}")
    path.write_text("".join(json.dumps(row) + "\n" for row in facts()))
    return path


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("cloze-calibration.jsonl")
    print(write_jsonl(out, exclude=Path(__file__).resolve().parents[3] / "shared/data/cloze/facts.jsonl"))
