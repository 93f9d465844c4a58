"""Write ``prompts/capability.jsonl``: the offline multiple-choice capability check (see toolkit/capability.py).

Four categories of short, unambiguous items: ``arithmetic`` (answers computed and asserted here), ``facts``
(stable world knowledge, written by hand), ``reading`` (a short passage and a question about it) and ``code``
(short Python snippets whose printed output is obtained here by executing them). The correct choice's letter is
balanced across A-D by a fixed seed, so the file is reproducible: ``python scripts/make_capability.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "prompts" / "capability.jsonl"
N_PER = 54


def arithmetic(rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """(question, correct, distractors) with answers computed here."""
    items = []
    kinds = ["add", "sub", "mul", "div", "add3", "square", "pct", "mixed", "mod"]
    seen = set()
    while len(items) < N_PER:
        k = kinds[len(items) % len(kinds)]
        if k == "add":
            a, b = rng.randint(12, 99), rng.randint(12, 99)
            q, ans = f"What is {a} + {b}?", a + b
        elif k == "sub":
            a, b = rng.randint(50, 199), rng.randint(11, 49)
            q, ans = f"What is {a} - {b}?", a - b
        elif k == "mul":
            a, b = rng.randint(3, 12), rng.randint(3, 12)
            q, ans = f"What is {a} × {b}?", a * b
        elif k == "div":
            b, c = rng.randint(2, 9), rng.randint(3, 12)
            q, ans = f"What is {b * c} ÷ {b}?", c
            assert (b * c) // b == c
        elif k == "add3":
            a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 30)
            q, ans = f"What is {a} + {b} + {c}?", a + b + c
        elif k == "square":
            a = rng.randint(2, 15)
            q, ans = f"What is {a} squared?", a * a
        elif k == "pct":
            p, base = rng.choice([10, 20, 25, 50]), rng.choice([40, 60, 80, 120, 200, 300, 400])
            q, ans = f"What is {p}% of {base}?", p * base // 100
            assert p * base % 100 == 0
        elif k == "mixed":
            a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
            q, ans = f"What is {a} × {b} + {c}?", a * b + c
        else:
            a, b = rng.randint(10, 60), rng.randint(3, 9)
            q, ans = f"What is the remainder when {a} is divided by {b}?", a % b
        if q in seen:
            continue
        seen.add(q)
        assert ans == int(ans) and ans >= 0
        offsets = rng.sample([-10, -2, -1, 1, 2, 10, 3, -3], 3)
        wrong = [str(ans + o) for o in offsets if ans + o >= 0]
        while len(wrong) < 3:
            cand = str(ans + rng.randint(4, 9))
            if cand not in wrong and cand != str(ans):
                wrong.append(cand)
        items.append((q, str(ans), wrong[:3]))
    return items


FACTS = [
    ("What is the capital of France?", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Nagoya"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Naples", "Venice"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Hamburg", "Frankfurt"]),
    ("What is the capital of Spain?", "Madrid", ["Barcelona", "Seville", "Valencia"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("What is the capital of Australia?", "Canberra", ["Sydney", "Melbourne", "Perth"]),
    ("What is the capital of Egypt?", "Cairo", ["Alexandria", "Giza", "Luxor"]),
    ("What is the capital of Russia?", "Moscow", ["Saint Petersburg", "Kazan", "Novosibirsk"]),
    ("What is the capital of the United Kingdom?", "London", ["Manchester", "Edinburgh", "Liverpool"]),
    ("What is the capital of China?", "Beijing", ["Shanghai", "Guangzhou", "Shenzhen"]),
    ("What is the capital of Greece?", "Athens", ["Thessaloniki", "Sparta", "Patras"]),
    ("What is the capital of Portugal?", "Lisbon", ["Porto", "Braga", "Faro"]),
    ("What is the capital of Norway?", "Oslo", ["Bergen", "Stockholm", "Helsinki"]),
    ("What is the capital of Kenya?", "Nairobi", ["Mombasa", "Kampala", "Addis Ababa"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Go", "Gd"]),
    ("What is the chemical symbol for iron?", "Fe", ["Ir", "In", "F"]),
    ("What is the chemical symbol for sodium?", "Na", ["So", "S", "Sd"]),
    ("What is the chemical symbol for oxygen?", "O", ["Ox", "Og", "Os"]),
    ("What is the chemical symbol for silver?", "Ag", ["Si", "Au", "Sv"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "NaCl", "O2"]),
    ("Which gas do plants absorb from the air for photosynthesis?", "Carbon dioxide", ["Oxygen", "Helium", "Nitrogen"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("Which planet is the largest in the Solar System?", "Jupiter", ["Saturn", "Neptune", "Earth"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Mercury"]),
    ("Which planet is famous for its prominent rings?", "Saturn", ["Mars", "Mercury", "Venus"]),
    ("What is the natural satellite of the Earth called?", "The Moon", ["The Sun", "Mars", "Titan"]),
    ("How many minutes are in one hour?", "60", ["100", "30", "24"]),
    ("How many days are in a leap year?", "366", ["365", "364", "360"]),
    ("How many centimeters are in one meter?", "100", ["10", "1000", "12"]),
    ("How many grams are in one kilogram?", "1000", ["100", "10", "500"]),
    ("How many sides does a hexagon have?", "6", ["5", "7", "8"]),
    ("How many legs does a spider have?", "8", ["6", "10", "4"]),
    ("How many continents are there on Earth?", "7", ["5", "6", "9"]),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100", ["0", "50", "212"]),
    ("At what temperature in degrees Celsius does water freeze at sea level?", "0", ["100", "32", "-10"]),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("Who wrote the novel Pride and Prejudice?", "Jane Austen", ["Emily Bronte", "Virginia Woolf", "George Eliot"]),
    ("Who wrote the novel 1984?", "George Orwell", ["Aldous Huxley", "Ray Bradbury", "H. G. Wells"]),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ["Michelangelo", "Raphael", "Pablo Picasso"]),
    ("Who developed the theory of general relativity?", "Albert Einstein", ["Isaac Newton", "Niels Bohr", "Galileo Galilei"]),
    ("Who composed the Fifth Symphony that opens with four famous notes?", "Ludwig van Beethoven", ["Johann Sebastian Bach", "Frederic Chopin", "Antonio Vivaldi"]),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean"]),
    ("What is the longest river in South America?", "Amazon", ["Nile", "Mississippi", "Danube"]),
    ("What is the tallest mountain on Earth above sea level?", "Mount Everest", ["K2", "Mont Blanc", "Kilimanjaro"]),
    ("Which organ pumps blood through the human body?", "Heart", ["Lungs", "Liver", "Kidneys"]),
    ("What is the largest mammal on Earth?", "Blue whale", ["African elephant", "Giraffe", "Hippopotamus"]),
    ("What is the main language spoken in Brazil?", "Portuguese", ["Spanish", "French", "Italian"]),
    ("What is the currency of Japan?", "Yen", ["Won", "Yuan", "Rupee"]),
    ("What is the currency of the United Kingdom?", "Pound sterling", ["Euro", "Dollar", "Franc"]),
    ("What is the hardest natural substance?", "Diamond", ["Gold", "Iron", "Quartz"]),
    ("What color do you get by mixing blue and yellow paint?", "Green", ["Purple", "Orange", "Red"]),
    ("Which animal is known as the king of the jungle?", "Lion", ["Tiger", "Elephant", "Gorilla"]),
    ("What is the freezing point of water in degrees Fahrenheit?", "32", ["0", "100", "212"]),
    ("In which country are the ancient pyramids of Giza?", "Egypt", ["Mexico", "Peru", "Greece"]),
    ("Which element has the atomic number 1?", "Hydrogen", ["Helium", "Oxygen", "Carbon"]),
]

NAMES = ["Tom", "Anna", "Ravi", "Maria", "Ken", "Lucy", "Omar", "Sofia", "Ben", "Mei", "Jack", "Nina"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["ball", "kite", "hat", "bike", "cup", "scarf"]
PLACES = ["the drawer", "the car", "the kitchen", "the garden", "the basement", "the office"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
PETS = ["a dog", "a cat", "a parrot", "a rabbit", "a turtle", "a hamster"]
CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Prague"]


def reading(rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """(question, correct, distractors): templated passages whose answer is stated in the passage."""
    items, seen = [], set()
    kinds = ["color", "place", "day", "pet", "order", "city"]
    while len(items) < N_PER:
        k = kinds[len(items) % len(kinds)]
        a, b = rng.sample(NAMES, 2)
        if k == "color":
            ca, cb = rng.sample(COLORS, 2)
            t = rng.choice(THINGS)
            q = f"Passage: {a} has a {ca} {t}. {b} has a {cb} {t}.\nQuestion: What color is {a}'s {t}?"
            ans, pool = ca, [c for c in COLORS if c != ca]
            wrong = [cb] + rng.sample([c for c in pool if c != cb], 2)
        elif k == "place":
            pa, pb = rng.sample(PLACES, 2)
            q = (f"Passage: {a} left the keys in {pa}. Later, {b} moved the umbrella to {pb}.\n"
                 f"Question: Where are the keys?")
            ans = pa
            wrong = [pb] + rng.sample([p for p in PLACES if p not in (pa, pb)], 2)
        elif k == "day":
            d1, d2 = rng.sample(DAYS, 2)
            q = (f"Passage: {a}'s meeting with {b} was planned for {d1}, but it was moved to {d2}.\n"
                 f"Question: On which day will the meeting take place?")
            ans = d2
            wrong = [d1] + rng.sample([d for d in DAYS if d not in (d1, d2)], 2)
        elif k == "pet":
            p1, p2 = rng.sample(PETS, 2)
            q = f"Passage: {a} owns {p1}. {b} owns {p2}.\nQuestion: Which pet does {b} own?"
            ans = p2
            wrong = [p1] + rng.sample([p for p in PETS if p not in (p1, p2)], 2)
        elif k == "order":
            c = rng.choice([n for n in NAMES if n not in (a, b)])
            q = (f"Passage: {a} arrived at the party first. {b} came an hour later, and {c} arrived last.\n"
                 f"Question: Who arrived last?")
            ans = c
            wrong = [a, b, rng.choice([n for n in NAMES if n not in (a, b, c)])]
        else:
            c1, c2 = rng.sample(CITIES, 2)
            q = (f"Passage: {a} was born in {c1} and moved to {c2} for work ten years later.\n"
                 f"Question: In which city was {a} born?")
            ans = c1
            wrong = [c2] + rng.sample([c for c in CITIES if c not in (c1, c2)], 2)
        if q in seen:
            continue
        seen.add(q)
        assert ans in q and ans not in wrong and len(set(wrong)) == 3
        items.append((q, ans, wrong))
    return items


def run(code: str) -> str:
    """What ``code`` prints (stripped)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})
    return buf.getvalue().strip()


def code(rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """(question, correct, distractors): snippets executed here to get the answer."""
    items, seen = [], set()
    while len(items) < N_PER:
        k = len(items) % 9
        if k == 0:
            n = rng.randint(2, 7)
            xs = [rng.randint(1, 9) for _ in range(n)]
            src = f"print(len({xs}))"
            wrong = [str(n + 1), str(n - 1), str(sum(xs))]
        elif k == 1:
            xs = [rng.randint(1, 9) for _ in range(rng.randint(3, 5))]
            src = f"print(sum({xs}))"
            s = sum(xs)
            wrong = [str(s + 1), str(len(xs)), str(max(xs))]
        elif k == 2:
            w = rng.choice(["python", "banana", "laptop", "orange", "window", "garden", "rocket", "silver"])
            src = f"print('{w}'[0])"
            wrong = [w[1], w[-1], w[:2]]
        elif k == 3:
            w = rng.choice(["hello", "world", "apple", "table", "chair", "music", "light", "paper"])
            src = f"print('{w}'.upper())"
            wrong = [w, w.capitalize(), w[::-1].upper()]
        elif k == 4:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            src = f"x = {a}\ny = {b}\nprint(x * y)"
            wrong = [str(a + b), str(a * b + 1), f"{a}{b}"]
        elif k == 5:
            lo, n = rng.randint(0, 3), rng.randint(4, 8)
            src = f"total = 0\nfor i in range({lo}, {n}):\n    total += i\nprint(total)"
            s = sum(range(lo, n))
            wrong = [str(s + n), str(n - lo), str(s - 1)]
        elif k == 6:
            xs = rng.sample(range(1, 20), 4)
            src = f"print(max({xs}))"
            m = max(xs)
            wrong = [str(min(xs)), str(xs[0]) if xs[0] != m else str(xs[1]), str(sum(xs))]
        elif k == 7:
            w = rng.choice(["abc", "dog", "star", "lamp", "moon", "desk"])
            src = f"print('{w}'[::-1])"
            wrong = [w, w[1:] + w[0], w.upper()]
        else:
            a, b = rng.randint(10, 40), rng.randint(3, 7)
            src = f"print({a} // {b})"
            wrong = [str(a // b + 1), str(a % b), str(a - b)]
        ans = run(src)
        q = f"What does this Python code print?\n{src}"
        wrong = [w for w in dict.fromkeys(wrong) if w != ans]
        while len(wrong) < 3:
            c = str(rng.randint(0, 60))
            if c != ans and c not in wrong:
                wrong.append(c)
        if q in seen:
            continue
        seen.add(q)
        assert ans not in wrong[:3] and len(set(wrong[:3])) == 3, (q, ans, wrong)
        items.append((q, ans, wrong[:3]))
    return items


def check_arithmetic(q: str) -> int:
    """The answer to an arithmetic question, recomputed from its text."""
    if m := re.fullmatch(r"What is the remainder when (\d+) is divided by (\d+)\?", q):
        return int(m[1]) % int(m[2])
    if m := re.fullmatch(r"What is (\d+) squared\?", q):
        return int(m[1]) ** 2
    if m := re.fullmatch(r"What is (\d+)% of (\d+)\?", q):
        return int(m[1]) * int(m[2]) // 100
    m = re.fullmatch(r"What is ([\d +\-×÷]+)\?", q)
    value = eval(m[1].replace("×", "*").replace("÷", "/"))
    assert value == int(value)
    return int(value)


def main() -> None:
    rng = random.Random(20261203)
    cats = {"arithmetic": arithmetic(rng), "facts": FACTS, "reading": reading(rng), "code": code(rng)}
    rows = []
    for cat, items in cats.items():
        for q, ans, wrong in items:
            assert len(wrong) == 3 and ans not in wrong and len(set(wrong)) == 3, (q, ans, wrong)
            rows.append((cat, q, ans, wrong))
    n = len(rows)
    letters = [i % 4 for i in range(n)]
    rng.shuffle(letters)
    out = []
    for i, ((cat, q, ans, wrong), pos) in enumerate(zip(rows, letters)):
        wrong = list(wrong)
        rng.shuffle(wrong)
        choices = wrong[:pos] + [ans] + wrong[pos:]
        assert choices[pos] == ans and len(set(choices)) == 4
        out.append({"id": f"cap-{i + 1:04d}", "category": cat, "question": q, "choices": choices,
                    "answer": "ABCD"[pos]})
    assert len({r["question"] for r in out}) == n
    # re-check code and arithmetic answers from the written rows
    for r in out:
        right = r["choices"]["ABCD".index(r["answer"])]
        if r["category"] == "arithmetic":
            assert int(right) == check_arithmetic(r["question"]), r
        if r["category"] == "code":
            assert run(r["question"].split("\n", 1)[1]) == r["choices"]["ABCD".index(r["answer"])]
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print(f"wrote {n} items to {OUT}: {dict(Counter(r['category'] for r in out))}, "
          f"letters {dict(sorted(Counter(r['answer'] for r in out).items()))}")


if __name__ == "__main__":
    main()
