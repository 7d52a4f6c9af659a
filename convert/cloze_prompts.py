"""Free-answer calibration prompts: our own cloze facts, disjoint from ../shared/data/cloze.

Calibration needs no labels (targets come from the model), but the few-shot prefixes do, so
each fact carries its answer. Categories mirror the shared benchmark set (capitals, addition,
opposites, sequences, colours, plurals) with different facts; `write_jsonl` writes them in the
shared set's format (`{"id", "prompt", "answer", "category"}`), which `edge_spade.datasets`
reads with few-shot prefixes built from other facts of the same category.

    python convert/cloze_prompts.py convert/cloze-calibration.jsonl
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
OPPOSITES = {
    "near": "far", "long": "short", "thick": "thin", "young": "old", "clean": "dirty", "cheap": "expensive",
    "loud": "quiet", "love": "hate", "win": "lose", "push": "pull", "buy": "sell", "north": "south",
    "east": "west", "summer": "winter", "heavy": "light", "first": "last", "true": "false", "alive": "dead",
    "top": "bottom", "inside": "outside", "easy": "difficult", "safe": "dangerous", "friend": "enemy",
    "sweet": "sour", "black": "white", "boy": "girl", "king": "queen", "wide": "narrow", "deep": "shallow",
    "always": "never", "before": "after", "asleep": "awake",
}
SEQUENCES = {
    "Friday, Saturday, Sunday,": "Monday", "Saturday, Sunday, Monday,": "Tuesday",
    "Sunday, Monday, Tuesday,": "Wednesday", "February, March, April,": "May", "April, May, June,": "July",
    "June, July, August,": "September", "August, September, October,": "November",
    "October, November, December,": "January", "two, three, four,": "five", "four, five, six,": "seven",
    "six, seven, eight,": "nine", "eight, nine, ten,": "eleven", "2, 4, 6,": "8", "1, 2, 3,": "4",
    "10, 20, 30,": "40", "5, 10, 15,": "20", "A, B, C,": "D", "first, second, third,": "fourth",
}
COLOURS = {
    "A ripe tomato is": "red", "The colour of a lemon is": "yellow", "Milk is": "white", "A frog is": "green",
    "Chocolate is": "brown", "The night sky is": "black", "A carrot is": "orange", "An eggplant is": "purple",
    "A polar bear is": "white", "Ripe strawberries are": "red", "A flamingo is": "pink", "Ripe cherries are": "red",
    "The leaves of a tree in summer are": "green",
}
PLURALS = {
    "child": "children", "tooth": "teeth", "woman": "women", "person": "people", "ox": "oxen",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies",
    "louse": "lice", "cactus": "cacti",
}


def facts() -> list[dict]:
    rows: list[tuple[str, str, str]] = []
    rows += [("capital", f"The capital of {c} is", a) for c, a in CAPITALS.items()]
    rows += [("addition", f"{a} + {b} =", str(a + b)) for a in range(1, 10) for b in range(1, 10) if a + b >= 10]
    rows += [("opposite", f"The opposite of {w} is", a) for w, a in OPPOSITES.items()]
    rows += [("sequence", p, a) for p, a in SEQUENCES.items()]
    rows += [("color", p, a) for p, a in COLOURS.items()]
    rows += [("plural", f"One {w}, two", a) for w, a in PLURALS.items()]
    return [{"id": f"calib-{i}", "prompt": p, "answer": " " + a, "category": c} for i, (c, p, a) in enumerate(rows)]


def write_jsonl(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in facts()))
    return path


if __name__ == "__main__":
    print(write_jsonl(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("cloze-calibration.jsonl")))
