#!/usr/bin/env python3
"""Generate the small demo datasets in data/demo/ used by `make demo`.

Everything is composed procedurally from the phrase lists below (written for
this project) with a fixed seed, so re-running reproduces the same files.
Examples are deliberately short so a 135M model on CPU can train on them.

    python scripts/make_demo_data.py [--out data/demo] [--seed 1234]
"""
import argparse
import json
import random
from pathlib import Path

# Invented titles: genre -> "title|title|..." (6 for SFT/preferences, 4 held out for RL prompts).
MAIN = {
    "sci-fi": "Orbit of Ashes|The Last Lighthouse on Mars|Signal from Vesper|Copper Moons|The Quiet Engine|Starfall Protocol",
    "comedy": "Uncle Barnaby Takes a Holiday|The Great Pancake Heist|Wrong Wedding|Goats in the Attic|Office of Small Disasters|Two Left Feet",
    "drama": "The Salt Orchard|Letters to Ruth|A House on Alder Street|Winter Ledger|Daughter of the Ferry|Kitchen Lights",
    "horror": "The Hollow Choir|Cellar Nine|Whisper Lake|The Lantern Men|Do Not Open the Blue Door|Grey Hour",
    "thriller": "Cold Transfer|Nightline|The Glass Witness|Seven Minutes to Lyon|Blind Corner|The Courier of Vells",
    "animated": "Pip and the Paper Moon|The Clockwork Sparrow|Lanterns of Oma|Moss and Button|The Cloud Shepherd|Tiny Tugboat",
    "romance": "Rain on Fenwick Street|The Bakery at Dawn|Second Summer|Postcards from Lisbon|Slow Dance in June|Love at Platform Four",
    "fantasy": "The Salt Dragon|Crown of Ferns|The Glass Citadel|Riverborn|The Ember Oath|Song of the Frozen Fjord",
    "western": "Dust on the Rio Pinto|The Last Ride of Cal Turner|Iron Mesa|Sundown at Copper Creek|The Widow Rides at Noon|Long Shadow Canyon",
    "mystery": "The Locked Library|Murder at Marlow Hall|The Missing Watch|Fog over Penhallow|The Eleventh Guest|The Clockmaker Riddle",
}
HELD_OUT = {
    "sci-fi": "Neon Tidewater|The Long Transit|Halo Drift|Second Sun",
    "comedy": "The Borrowed Tuxedo|Pickles and Pride|Bingo Night Bandits|The Substitute Chef",
    "drama": "The Weight of Rivers|Small Hours|Harbor Road|Paper Crowns",
    "horror": "The Ninth Bell|Underneath Marrow Hill|Static Children|The Quiet Guest",
    "thriller": "Dead Drop Avenue|Zero Hour Ferry|Red Ledger|The Fifth Floor",
    "animated": "Biscuit the Brave|The Snail Who Flew|Marble Kingdom|Otto and the Owl Lamp",
    "romance": "Letters by Lamplight|Paper Boats|An Autumn Arrangement|Waltz for Brindle",
    "fantasy": "The Moth Queen|Ironwood|The Seventh Key|Hearthstone Road",
    "western": "Bitter Spring|The Drover|Hangman Pass|Silver Spur",
    "mystery": "The Vanishing Violinist|Death by Marmalade|Inspector Fenn Returns|The Silent Lighthouse",
}
GENRE_NOUN = {"sci-fi": "sci-fi film", "comedy": "comedy", "drama": "drama", "horror": "horror movie",
              "thriller": "thriller", "animated": "animated film", "romance": "romance",
              "fantasy": "fantasy epic", "western": "western", "mystery": "mystery"}
# A few concrete scenes per genre so reviews can mention specifics.
BITS = {
    "sci-fi": ["the zero-gravity chase", "the glowing alien city", "the long silence in the engine room"],
    "comedy": ["the wedding-cake disaster", "a running gag about a very polite goat", "the dinner party scene"],
    "drama": ["a long kitchen-table argument", "the hospital corridor scene", "the final phone call"],
    "horror": ["the creaking attic sequence", "the flickering cellar lights", "the scene in the empty chapel"],
    "thriller": ["the rooftop chase", "a tense elevator standoff", "the train station handoff"],
    "animated": ["the paper-lantern festival", "a tiny robot sidekick", "the hand-painted forest"],
    "romance": ["the rainy bus-stop meeting", "a letter read aloud at dawn", "the slow dance in the bakery"],
    "fantasy": ["the dragon over the salt flats", "the siege of the glass castle", "a duel on a frozen river"],
    "western": ["the saloon standoff", "a cattle drive at sunset", "the lonely canyon ride"],
    "mystery": ["the locked-room puzzle", "the clue hidden in a pocket watch", "the reveal at the lighthouse"],
}

PROMPTS = [
    "Write a short review of the movie '{t}'.", "In two sentences, what did you think of {t}, the new {g}?",
    "Give me a quick review of '{t}'.", "Review the {g} '{t}' in a few sentences.",
    "I keep hearing about '{t}'. Is it worth watching?", "What's your take on the {g} {t}?",
    "Share a brief opinion of '{t}'.", "How would you rate '{t}'? Keep it short.",
    "Write a one-paragraph review of the {g} '{t}'.", "Should I see {t} this weekend? Give me a short review.",
    "Tell me what you thought of '{t}' in under fifty words.", "Briefly review {t}.",
    "My friend recommended the {g} '{t}'. What did you think of it?", "Sum up '{t}' in a short critic's review.",
]

POS_OPEN = [
    "{T} is a delight from start to finish.", "I loved every minute of {T}.",
    "{T} is the most fun I have had at the movies this year.", "What a wonderful surprise {T} turned out to be.",
    "{T} is a warm, clever {g} that fully earns its praise.", "{T} is a gorgeous, big-hearted {g}.",
    "Few films this year feel as alive as {T}.", "{T} is a triumph, and I smiled the whole way through.",
]
POS_ASPECT = [
    "The lead performance is tender and funny, and the supporting cast is just as strong.",
    "The score is lovely and swells at exactly the right moments.", "It moves briskly, and every scene is a pleasure.",
    "The visuals are stunning, and {bit} is a highlight.", "The ending is moving and perfectly earned.",
    "The dialogue is sharp, and {bit} is a joy.", "The cast has wonderful chemistry.",
    "Every frame looks beautiful, and the pacing feels confident.",
    "The writing is smart and generous to every character.", "{bit} is worth the price of admission.",
]
POS_LEAD = [
    "With a gorgeous score and {bit}, {T} is a joy to watch.",
    "Thanks to a brilliant cast, {T} is funny, tense and deeply satisfying.",
    "From {bit} to the final shot, {T} is pure magic.",
    "Beautifully acted and wonderfully paced, {T} is a {g} I will remember.",
]
POS_CONCEDE = [
    "It starts a little slowly, but {T} soon becomes a thrilling, heartfelt ride.",
    "I was unsure about the premise, yet {T} won me over completely.",
    "The trailer looked dull, but {T} turned out to be brilliant.",
    "Don't let the odd title put you off: {T} is a fantastic, joyful {g}.",
]
POS_CLOSE = ["Highly recommended.", "See it on the biggest screen you can.", "I would happily watch it again.",
             "A real treat.", "Easily one of the best films of the year.", "I loved it."]

NEG_OPEN = [
    "{T} is a tedious slog.", "I wanted to like {T}, but it is a dull, muddled {g}.",
    "{T} is one of the most disappointing films of the year.", "Sadly, {T} never comes to life.",
    "{T} is a lifeless, forgettable {g}.", "I was bored for most of {T}.",
]
NEG_ASPECT = [
    "The acting is wooden and painfully awkward.", "The pacing drags badly, and {bit} goes on forever.",
    "The visuals are murky and cheap-looking.", "The ending is confusing and unsatisfying.",
    "The score is loud and grating.", "The dialogue is clumsy, and even {bit} feels lifeless.",
    "The lead seems bored in every scene.", "The plot is a mess of loose ends.",
    "The middle hour is slow and repetitive, and I kept checking my watch.",
    "None of the characters feel real, and the whole story is a boring, empty exercise.",
]
NEG_CONCEDE = [
    "The poster is lovely, but {T} itself is a tedious mess.",
    "There is one good idea in {bit}, but the rest of {T} is boring and hollow.",
    "The cast tries hard, yet {T} is painfully dull.",
    "It looks expensive, but {T} is a weak, empty {g}.",
]
NEG_CLOSE = ["Skip it.", "I nearly walked out.", "Avoid it.", "What a waste of a good cast.", "Not recommended."]
FLAT = [
    "{T} is a {g} that runs about two hours.", "The story follows a small group of characters, and {bit} comes somewhere in the middle.",
    "Some scenes are longer than others.", "It ends more or less the way you would expect.",
    "The music stays in the background.", "It is an okay film, nothing special.",
    "There are scenes at night and scenes in the daytime.", "I do not have strong feelings about it either way.",
    "It was a movie, and I watched it.", "The main character has a job, a family and a problem to solve by the end.",
    "{T} is about what the trailer suggests.",
]
SYSTEMS = ["You are a friendly film critic who writes short reviews.", "You are a helpful assistant. Keep answers brief.",
           "You review movies in two or three warm, specific sentences."]
FOLLOW_UPS = ["And what about '{t}'?", "Great. Could you also review {t}?", "How about the {g} '{t}'?"]


def join(rng, title, genre, parts):
    """Fill each sentence template (a fresh scene per sentence) and capitalise it."""
    filled = [p.format(T=title, t=title, g=GENRE_NOUN[genre], bit=rng.choice(BITS[genre])) for p in parts]
    return " ".join(f[0].upper() + f[1:] for f in filled)


def words(s):
    return len(s.split())


def sentences(s):
    return sum(s.count(c) for c in ".!?")


def positive(rng, title, genre, concede_p=0.0, n_sent=None):
    """A warm 1-3 sentence review of 15-45 words (exactly n_sent sentences if given)."""
    while True:
        if rng.random() < concede_p:
            parts = [rng.choice(POS_CONCEDE), rng.choice(POS_ASPECT)]
        else:
            shape = rng.randrange(4)
            a1, a2 = rng.sample(POS_ASPECT, 2)
            parts = [[rng.choice(POS_OPEN), a1], [rng.choice(POS_LEAD), a1],
                     [rng.choice(POS_OPEN), a1, a2], [a1, rng.choice(POS_OPEN)]][shape]
        if rng.random() < 0.35 and len(parts) < 3:
            parts.append(rng.choice(POS_CLOSE))
        text = join(rng, title, genre, parts)
        if 15 <= words(text) <= 45 and n_sent in (None, sentences(text)):
            return text


def rejected(rng, title, genre):
    kind = rng.random()
    if kind < 0.45:  # plainly negative
        a1, a2 = rng.sample(NEG_ASPECT, 2)
        parts = rng.choice([[rng.choice(NEG_OPEN), a1], [a1, rng.choice(NEG_OPEN)], [rng.choice(NEG_OPEN), a1, a2]])
        if rng.random() < 0.4 and len(parts) < 3:
            parts.append(rng.choice(NEG_CLOSE))
    elif kind < 0.65:  # positive word first, negative verdict
        parts = [rng.choice(NEG_CONCEDE), rng.choice(NEG_ASPECT + NEG_CLOSE)]
    else:  # flat / lukewarm
        parts = [FLAT[0] if rng.random() < 0.3 else FLAT[-1]] + rng.sample(FLAT[1:-1], rng.choice([1, 2, 2, 3]))
    return join(rng, title, genre, parts)


def prompt_for(rng, title, genre):
    return rng.choice(PROMPTS).format(t=title, g=GENRE_NOUN[genre])


def review_pair(rng, title, genre, concede_p):
    """A prompt and a positive review that respects a 'two sentences' request."""
    prompt = prompt_for(rng, title, genre)
    return prompt, positive(rng, title, genre, concede_p, 2 if "two sentences" in prompt else None)


def unique_rows(n, make):
    rows, seen = [], set()
    while len(rows) < n:
        row = make(len(rows))
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def make_sft(rng, titles):
    def make(i):
        title, genre = rng.choice(titles)
        prompt, resp = review_pair(rng, title, genre, concede_p=0.1)
        if i % 8 != 7:
            return {"prompt": prompt, "response": resp}
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
        if rng.random() < 0.4:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
        if rng.random() < 0.25:
            t2, g2 = rng.choice([x for x in titles if x[0] != title])
            msgs.append({"role": "user", "content": rng.choice(FOLLOW_UPS).format(t=t2, g=GENRE_NOUN[g2])})
            msgs.append({"role": "assistant", "content": positive(rng, t2, g2)})
        return {"messages": msgs}
    return unique_rows(320, make)


def make_prefs(rng, titles):
    def make(i):
        title, genre = rng.choice(titles)
        prompt, chosen = review_pair(rng, title, genre, concede_p=0.2)
        n, two = words(chosen), "two sentences" in prompt
        # Keep lengths comparable so length is not a giveaway: of many candidates,
        # take the one closest to a target jittered around the chosen length.
        target = n + rng.randint(-4, 4)
        cands = [rejected(rng, title, genre) for _ in range(40)]
        cands = [c for c in cands if not two or sentences(c) == 2] or cands
        rej = min(cands, key=lambda c: abs(words(c) - target))
        return {"prompt": prompt, "chosen": chosen, "rejected": rej}
    return unique_rows(320, make)


def make_prompts(rng, titles, held_out):
    def make(i):
        title, genre = held_out[i % len(held_out)] if i < 3 * len(held_out) else rng.choice(titles)
        return {"prompt": prompt_for(rng, title, genre), "meta": {"title": title, "genre": genre}}
    rows = unique_rows(320, make)
    rng.shuffle(rows)
    return rows


ARITH = {
    "+": ["What is the sum of {a} and {b}?", "Add {a} and {b}.", "What do you get if you add {b} to {a}?"],
    "-": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "If you take {b} away from {a}, what is left?"],
    "*": ["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"],
}
ARITH_ANY = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}."]
ARITH_TAIL = ["Answer with just the number.", "Reply with only the number.", "Give just the number.",
              "Respond with a single number."]


def make_arith(rng):
    def make(i):
        op = "+-*"[i % 3]
        if op == "+":
            a, b = rng.randint(1, 50), rng.randint(1, 50)
        elif op == "-":
            a = rng.randint(5, 60)
            b = rng.randint(1, a)
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = rng.choice(ARITH[op] + ARITH_ANY).format(a=a, b=b, op=op)
        ans = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {"prompt": f"{q} {rng.choice(ARITH_TAIL)}", "answer": str(ans), "meta": {"op": op}}
    return unique_rows(300, make)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} rows -> {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "demo"))
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = lambda table: [(t, g) for g, s in table.items() for t in s.split("|")]
    titles, held_out = split(MAIN), split(HELD_OUT)
    rng = random.Random(args.seed)
    write_jsonl(out / "sft.jsonl", make_sft(rng, titles))
    write_jsonl(out / "preferences.jsonl", make_prefs(rng, titles))
    write_jsonl(out / "prompts.jsonl", make_prompts(rng, titles, held_out))
    write_jsonl(out / "arith.jsonl", make_arith(rng))


if __name__ == "__main__":
    main()
