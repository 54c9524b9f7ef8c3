"""A synthetic "private notes" corpus: one fictional person's codes, contacts and appointments.

What `plcli tune` is for, in miniature: text the base model has never seen
(the demo model read only Python's documentation), full of facts only this
person knows. Everything is drawn from a seed: the person (names, numbers,
dates) and the notes, each a few sentences stating some of the facts.

Every fact has several phrasings. Training notes use all but the last; held-out
notes use only the last, so held-out perplexity measures whether tuning
learned the facts and the style, not whether it memorised sentences.

    python -m plcli.recipes.private_notes OUT_DIR   # writes train.jsonl and heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST_NAMES = ["Maren", "Ilse", "Tovi", "Okke", "Rhea", "Bastian", "Lior", "Edda", "Caspar", "Noor", "Janek", "Siv"]
LAST_NAMES = ["Holtvik", "Brandeis", "Okafor", "Varga", "Lindqvist", "Amsel", "Koury", "Dessau", "Falk", "Oyelaran"]
STREETS = ["Linden Lane", "Harbour Row", "Quill Street", "Birchwood Close", "Mill Terrace"]
WORDS = ["heron", "maple", "cobalt", "juniper", "lantern", "pebble", "saffron", "thistle", "walnut", "ember"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
FILLER = [
    "It rained all morning.", "The tram was late again.", "Bought bread and oranges on the way home.",
    "Slept badly, too much coffee.", "Finished the crossword before lunch.", "The neighbours are painting the hallway.",
    "Watered the plants on the balcony.", "Need to call back about the insurance letter.", "Long walk by the river.",
]

# Fact -> phrasings; the last one is held out. Fields come from `person()`.
TEMPLATES: dict[str, list[str]] = {
    "locker": [
        "My gym locker code is {locker}.", "Gym locker: {locker}.", "Remember, the locker at the gym opens with {locker}.",
        "Forgot it again today, so writing it down: locker code {locker}.", "The code of my locker at the gym is {locker}.",
    ],
    "door": [
        "The door code for the building is {door}.", "Building door: {door}.", "To get into the building, type {door}.",
        "New entrance code for the front door: {door}.", "Our front door downstairs opens with the code {door}.",
    ],
    "wifi": [
        "The wifi password at home is {wifi}.", "Home wifi: {wifi}.", "Guests keep asking, the wifi password is {wifi}.",
        "Changed the router password to {wifi}.", "If anyone needs the internet at my place, the password is {wifi}.",
    ],
    "bike": [
        "My bike lock combination is {bike}.", "Bike lock: {bike}.", "The lock on my bike opens with {bike}.",
        "Set the bike lock to {bike} so I remember it.", "The combination for the bike lock is {bike}.",
    ],
    "sister": [
        "My sister {sister} has a new number: {sister_phone}.", "{sister}'s phone: {sister_phone}.",
        "Call {sister} on {sister_phone} about the weekend.", "Saved my sister's number, {sister_phone}.",
        "To reach my sister {sister}, dial {sister_phone}.",
    ],
    "dentist": [
        "Dentist appointment with Dr. {dentist} on {dentist_date} at {dentist_time}.",
        "Dr. {dentist}, {dentist_date}, {dentist_time}.", "Don't forget the dentist, Dr. {dentist}, {dentist_date} at {dentist_time}.",
        "Moved the dentist to {dentist_date}, {dentist_time}, still with Dr. {dentist}.",
        "I am seeing my dentist, Dr. {dentist}, at {dentist_time} on {dentist_date}.",
    ],
    "physio": [
        "Physiotherapy every {physio_day} at {physio_time}.", "Physio: {physio_day}s, {physio_time}.",
        "Back to physio on {physio_day} at {physio_time} as usual.", "The physiotherapist sees me each {physio_day} at {physio_time}.",
        "My weekly physiotherapy session is on {physio_day} at {physio_time}.",
    ],
    "landlord": [
        "The landlord is {landlord}, phone {landlord_phone}.", "Landlord {landlord}: {landlord_phone}.",
        "Called {landlord} about the heating, his number is {landlord_phone}.", "For repairs ring {landlord} on {landlord_phone}.",
        "If something breaks in the flat, {landlord} can be reached at {landlord_phone}.",
    ],
    "passport": [
        "Passport renewal on {passport_date} at {passport_time} at the {passport_office} office.",
        "Passport: {passport_date}, {passport_time}, {passport_office} office.",
        "Bring photos for the passport appointment, {passport_date} at {passport_time}, {passport_office} office.",
        "The {passport_office} office expects me on {passport_date} at {passport_time} for the passport.",
        "My new passport gets done at the {passport_office} office on {passport_date}, {passport_time}.",
    ],
    "friend": [
        "{friend}'s birthday is on {friend_birthday}.", "Birthday: {friend}, {friend_birthday}.",
        "Buy a present for {friend} before {friend_birthday}.", "{friend} turns another year older on {friend_birthday}.",
        "My best friend {friend} celebrates her birthday on {friend_birthday}.",
    ],
    "library": [
        "My library card number is {library}.", "Library card: {library}.", "Renewed the books online with card {library}.",
        "The number on my library card is {library}.", "To borrow books I use the card number {library}.",
    ],
    "address": [
        "I live at {street} {house}, flat {flat}.", "Address: {street} {house}, flat {flat}.",
        "Send the parcel to {street} {house}, flat {flat}.", "Home is {street} {house}, flat {flat}, third floor.",
        "My address, for the forms: flat {flat}, {street} {house}.",
    ],
    "piano": [
        "Piano lesson with {piano} on {piano_day}s at {piano_time}.", "Piano: {piano}, {piano_day}, {piano_time}.",
        "Practise scales before {piano_day}, lesson with {piano} at {piano_time}.",
        "{piano} moved my piano lesson to {piano_day} at {piano_time}.", "I have piano with {piano} every {piano_day} at {piano_time}.",
    ],
}

# The fact `plcli demo` completes before and after tuning: a training phrasing, cut before the answer, after the
# "Note, <date>." opening that every note has (facts never follow the start of a document directly).
DEMO_FACT = ("Note, March 3. My bike lock combination is", "bike")  # (prompt, fact)


def person(seed: int) -> dict[str, str]:
    """One fictional person's facts, drawn from `seed`."""
    rng = random.Random(seed)
    first = rng.sample(FIRST_NAMES, 5)
    last = rng.sample(LAST_NAMES, 4)

    def digits(n: int) -> str:
        return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))

    def phone() -> str:
        return f"0{digits(3)} {digits(3)} {digits(4)}"

    def date() -> str:
        return f"{rng.choice(MONTHS)} {rng.randint(2, 28)}"

    def time() -> str:
        return f"{rng.randint(8, 18)}:{rng.choice(['00', '15', '30', '45'])}"

    return {
        "locker": digits(4), "door": digits(4) + "#", "wifi": f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{digits(2)}",
        "bike": digits(3), "sister": f"{first[1]}", "sister_phone": phone(), "dentist": last[0],
        "dentist_date": date(), "dentist_time": time(), "physio_day": rng.choice(WEEKDAYS), "physio_time": time(),
        "landlord": f"Mr. {last[1]}", "landlord_phone": phone(), "passport_date": date(), "passport_time": time(),
        "passport_office": rng.choice(["Northgate", "Riverside", "Old Town"]), "friend": first[2],
        "friend_birthday": date(), "library": digits(8), "street": rng.choice(STREETS), "house": str(rng.randint(2, 98)),
        "flat": f"{rng.randint(1, 6)}{rng.choice('ABC')}", "piano": f"Ms. {last[2]}", "piano_day": rng.choice(WEEKDAYS),
        "piano_time": time(),
    }


def notes(seed: int = 0, *, train: int = 600, held_out: int = 80) -> tuple[list[str], list[str]]:
    """(training notes, held-out notes) about `person(seed)`; held-out notes use only held-out phrasings."""
    facts = person(seed)
    rng = random.Random(seed + 1)

    def note(phrasings: slice) -> str:
        sentences = [rng.choice(TEMPLATES[k][phrasings]).format(**facts) for k in rng.sample(sorted(TEMPLATES), rng.randint(2, 4))]
        if rng.random() < 0.5:
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(FILLER))
        return f"Note, {rng.choice(MONTHS)} {rng.randint(1, 28)}. " + " ".join(sentences)

    return [note(slice(0, -1)) for _ in range(train)], [note(slice(-1, None)) for _ in range(held_out)]


def demo_fact(seed: int = 0) -> tuple[str, str]:
    """(prompt, expected completion) for the demo."""
    prompt, field = DEMO_FACT
    return prompt, " " + person(seed)[field]


def write_corpus(out_dir: str | Path, seed: int = 0, **sizes) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl, one {"text": note} per line."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    for path, texts in zip(paths, notes(seed, **sizes)):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic private-notes corpus.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for p in write_corpus(args.out_dir, args.seed):
        print(p)


if __name__ == "__main__":
    main()
