"""A synthetic, seeded instruction corpus for the APAR demo model.

The domain is "practical tips": 12 topics, each with 7 items. An item has an
imperative title and two detail sentences that depend only on the item, so a tiny
model can learn the whole domain in a few CPU minutes. Three answer shapes:

- **list** (prompt names a count n = 3..6)::

      Here are 4 tips for staying healthy:

      1. Drink Water: Drink a glass of water with every meal. Water keeps ...

      2. Sleep Well: Aim for seven to eight hours of sleep each night. Good ...

  The ordered-list rule forks after each ``Title:``; the child writes the detail.
- **paragraph** (3 or 4 paragraphs): a one-sentence intro, then paragraphs of the form
  ``"First, drink water. <detail> <detail>"``; the paragraph rule forks after the first
  sentence.
- **plain**: one-paragraph answers and small talk; no rule applies, so they pass
  through unchanged and teach the model that not every answer forks.

Items of a list or paragraph answer are a random subset of the topic's items, kept in
the topic's order. Everything is drawn from ``random.Random(seed)``.

Held-out split (`heldout_keys`): prompts are identified by a key ``(kind, topic,
phrasing, count)``. With ``random.Random(seed + 1)``, for every topic, 2 of its 20 list
keys (5 phrasings x n in 3..6) and 1 of its 6 paragraph keys (3 phrasings x 3..4
paragraphs) are held out, and 8 plain keys over the whole domain. Training records never
use a held-out key, so a held-out prompt's exact text never appears in training, while
its topic and items do (other phrasings and counts of the same topic are trained).

Output records are ShareGPT style (``{"id", "conversations", "meta"}``), ready for
`apar_rt.train.data_format`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from apar_rt.model.tokenizer import vicuna_v1_1_prompt

# (gerund phrase, verb phrase, items: (title, detail 1, detail 2))
TOPICS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("staying healthy", "stay healthy", [
        ("Eat Fresh Food", "Fill half your plate with fruit and vegetables.",
         "Fresh food gives your body the vitamins it needs."),
        ("Drink Water", "Drink a glass of water with every meal.", "Water keeps your body and mind working well."),
        ("Move Every Day", "Walk, run or dance for at least thirty minutes.",
         "Regular movement keeps your heart strong."),
        ("Sleep Well", "Aim for seven to eight hours of sleep each night.", "Good sleep helps your body heal."),
        ("Limit Sugar", "Choose fruit instead of sweets and soda.", "Less sugar keeps your energy steady."),
        ("See a Doctor", "Visit your doctor once a year for a checkup.",
         "Early care stops small problems from growing."),
        ("Manage Stress", "Take a few slow breaths when you feel tense.", "A calm mind is good for your whole body."),
    ]),
    ("saving money", "save money", [
        ("Make a Budget", "Write down what you earn and what you spend.", "A budget shows you where your money goes."),
        ("Cook at Home", "Make simple meals instead of eating out.", "Home cooking costs far less than a restaurant."),
        ("Pay Yourself First", "Move a small part of every paycheck into savings.",
         "Saving first means you will not spend it."),
        ("Avoid Impulse Buys", "Wait one day before you buy something you do not need.",
         "Most of the time the wish will pass."),
        ("Cancel Unused Plans", "Check your bills for services you never use.", "Cancel them and keep the money."),
        ("Buy Used Items", "Look for good used furniture, books and clothes.", "Used items often cost half the price."),
        ("Set a Goal", "Pick a clear goal such as a trip or a new bike.", "A goal makes saving feel worth it."),
    ]),
    ("sleeping better", "sleep better", [
        ("Keep a Schedule", "Go to bed and wake up at the same time every day.", "Your body likes a steady rhythm."),
        ("Dim the Lights", "Turn down the lights an hour before bed.",
         "Darkness tells your brain that it is time to rest."),
        ("Avoid Screens", "Put your phone away thirty minutes before sleep.", "Bright screens keep your mind awake."),
        ("Cool Your Room", "Keep your bedroom cool and quiet.", "A cool room helps you fall asleep faster."),
        ("Skip Late Coffee", "Do not drink coffee after lunch.", "Caffeine can stay in your body for many hours."),
        ("Relax Before Bed", "Read a book or take a warm bath.", "A calm routine prepares you for sleep."),
        ("Get Morning Light", "Spend a few minutes outside after you wake up.", "Morning light sets your body clock."),
    ]),
    ("learning a new language", "learn a new language", [
        ("Practice Daily", "Study for a short time every day.", "Small daily steps add up quickly."),
        ("Learn Common Words", "Start with the most common words and phrases.",
         "They cover most of what people say."),
        ("Speak Early", "Talk with other learners from the first week.", "Speaking builds confidence fast."),
        ("Listen to Music", "Play songs in the new language.", "Music helps you remember new words."),
        ("Use Flash Cards", "Review words with flash cards on your phone.", "Short reviews keep words fresh."),
        ("Watch Shows", "Watch simple shows with subtitles.", "You will hear how people really talk."),
        ("Find a Partner", "Meet a native speaker who wants to learn your language.",
         "You can help each other every week."),
    ]),
    ("studying for exams", "study for exams", [
        ("Start Early", "Begin your review two weeks before the exam.", "Early study leaves time for hard topics."),
        ("Make a Plan", "Split the material into small parts for each day.", "A plan keeps you on track."),
        ("Test Yourself", "Answer practice questions without your notes.",
         "Testing shows what you still need to learn."),
        ("Take Breaks", "Rest for five minutes after each half hour.", "Short breaks keep your mind sharp."),
        ("Teach a Friend", "Explain a topic to a friend in simple words.", "Teaching helps you understand it better."),
        ("Sleep Before Exams", "Get a full night of sleep before the test.", "A rested brain remembers more."),
        ("Study in Quiet", "Find a quiet place with no noise.", "Fewer distractions help you focus."),
    ]),
    ("keeping a clean home", "keep a clean home", [
        ("Clean Daily", "Spend ten minutes cleaning every day.", "Small tasks stop big messes."),
        ("Put Things Back", "Return each item to its place after you use it.", "A tidy home is easy to clean."),
        ("Make the Bed", "Make your bed every morning.", "It makes the whole room look neat."),
        ("Wash Dishes Quickly", "Wash the dishes right after each meal.", "Clean dishes keep the kitchen fresh."),
        ("Remove Clutter", "Give away things you no longer use.", "Less stuff means less to clean."),
        ("Share the Work", "Give each person in the home a few tasks.", "Shared work gets done faster."),
        ("Use a Checklist", "Write a short list of weekly tasks.", "A list helps you remember every room."),
    ]),
    ("growing a garden", "grow a garden", [
        ("Choose Sunny Spots", "Plant your garden where it gets six hours of sun.",
         "Most plants need strong light to grow."),
        ("Improve the Soil", "Mix compost into the soil before you plant.", "Rich soil feeds your plants."),
        ("Start Small", "Begin with a few easy plants.", "A small garden is simple to care for."),
        ("Water Deeply", "Water the roots in the early morning.", "Deep watering makes roots strong."),
        ("Pull Weeds", "Remove weeds every week.", "Weeds steal water from your plants."),
        ("Add Mulch", "Spread mulch around each plant.", "Mulch keeps the soil moist and cool."),
        ("Plant Herbs", "Grow basil, mint and parsley.", "Herbs are easy to grow and useful in the kitchen."),
    ]),
    ("cooking at home", "cook at home", [
        ("Plan Your Meals", "Choose your meals for the week on Sunday.", "A plan saves time and money."),
        ("Keep Basic Items", "Stock rice, pasta, beans and spices.", "With these you can always make a meal."),
        ("Cook in Batches", "Make a big pot of soup or stew.", "You can eat it for several days."),
        ("Use Simple Recipes", "Pick recipes with few steps and few items.", "Simple recipes build your skills."),
        ("Prepare Ahead", "Cut vegetables before you start to cook.",
         "Cooking goes faster when everything is ready."),
        ("Taste as You Go", "Taste your food while it cooks.", "Small changes make a big difference."),
        ("Clean as You Cook", "Wash tools while the food cooks.", "The kitchen stays clean at the end."),
    ]),
    ("working from home", "work from home", [
        ("Set Up a Workspace", "Choose one place in your home just for work.", "A fixed space helps you focus."),
        ("Keep Regular Hours", "Start and stop work at the same time each day.",
         "Clear hours protect your free time."),
        ("Dress for Work", "Change out of your sleep clothes in the morning.", "It puts you in a working mood."),
        ("Take Real Breaks", "Step away from your desk for lunch.", "A real break gives you new energy."),
        ("Stay in Touch", "Talk with your team every day.", "Regular contact keeps everyone on the same page."),
        ("Limit Distractions", "Turn off the television while you work.", "Quiet helps you finish tasks faster."),
        ("Move Often", "Stand up and stretch every hour.", "Moving keeps your back and mind healthy."),
    ]),
    ("reducing stress", "reduce stress", [
        ("Breathe Slowly", "Take five slow breaths when you feel tense.", "Slow breathing calms your body."),
        ("Go for a Walk", "Walk outside for twenty minutes.", "Fresh air clears your mind."),
        ("Talk to Someone", "Share your worries with a friend.", "Talking makes problems feel smaller."),
        ("Write It Down", "Write your thoughts in a notebook.", "Writing helps you see things clearly."),
        ("Do One Thing", "Focus on one task at a time.", "Doing less at once lowers pressure."),
        ("Say No", "Turn down tasks you do not have time for.", "Your time and energy are limited."),
        ("Laugh More", "Watch a funny show or call a funny friend.", "Laughter relaxes your whole body."),
    ]),
    ("traveling on a budget", "travel on a budget", [
        ("Book Early", "Buy your tickets a few months ahead.", "Early tickets are often much cheaper."),
        ("Travel Off Season", "Visit places when fewer people go.", "Prices drop when crowds are small."),
        ("Stay in Hostels", "Sleep in hostels or small guest houses.", "They cost much less than hotels."),
        ("Eat Local Food", "Eat where local people eat.", "Local food is cheap and tasty."),
        ("Use Public Transport", "Take buses and trains instead of taxis.", "Public transport saves a lot of money."),
        ("Pack Light", "Bring only one small bag.", "You avoid extra fees and move freely."),
        ("Find Free Sights", "Visit parks, beaches and free museums.", "Many great places cost nothing."),
    ]),
    ("making new friends", "make new friends", [
        ("Join a Club", "Join a club for a hobby you enjoy.", "You will meet people who like the same things."),
        ("Say Hello", "Greet the people you see often.", "A simple hello can start a friendship."),
        ("Ask Questions", "Ask people about their lives and listen well.", "People like to feel heard."),
        ("Volunteer Together", "Help out at a local event or charity.", "Working together builds strong bonds."),
        ("Accept Invitations", "Say yes when someone invites you out.", "Each event is a chance to connect."),
        ("Be Patient", "Give new friendships time to grow.", "Close friends are made over many months."),
        ("Stay in Contact", "Send a message to people you enjoyed meeting.",
         "Small gestures keep friendships alive."),
    ]),
]

LIST_COUNTS = (3, 4, 5, 6)
# (prompt, intro); {n}, {g} (gerund) and {v} (verb phrase) are filled in.
LIST_PHRASINGS = (
    ("Give me {n} tips for {g}.", "Here are {n} tips for {g}:"),
    ("What are {n} ways to {v}?", "Here are {n} ways to {v}:"),
    ("List {n} ideas to help me {v}.", "Here are {n} ideas to help you {v}:"),
    ("Share {n} tips on {g}.", "Here are {n} tips for {g}:"),
    ("How can I {v}? Give me {n} tips.", "Here are {n} tips for {g}:"),
)
PARAGRAPH_COUNTS = (3, 4)
_COUNT_WORDS = {3: "three", 4: "four"}
PARAGRAPH_PHRASINGS = (
    "Write {k} short paragraphs about {g}.",
    "Tell me about {g} in {k} paragraphs.",
    "Describe {g} in {k} paragraphs.",
)
PARAGRAPH_INTRO = "Here are some thoughts on {g}."
ORDINALS = ("First", "Second", "Third", "Fourth")
# Plain prompts about a topic: (prompt, answer); {t} is a lower-case title, {d} the details.
PLAIN_TOPIC_PHRASINGS = (
    ("What is the best tip for {g}?", "The best tip is to {t}. {d}"),
    ("Give me one tip for {g}.", "Here is one tip: {t}. {d}"),
)
# Small talk with fixed answers.
SMALL_TALK = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Thank you!", "You are welcome. I am glad I could help."),
    ("Thanks for the help.", "You are welcome. Let me know if you need more tips."),
    ("Who are you?", "I am a small assistant that gives practical tips."),
    ("What can you do?", "I can give you tips on health, money, sleep, study, travel and more."),
)

PromptKey = tuple[str, int, int, int]  # (kind, topic, phrasing, count); count 0 when unused


@dataclass(frozen=True)
class Sample:
    """One generated prompt and answer."""

    key: PromptKey
    prompt: str
    answer: str

    @property
    def kind(self) -> str:
        return self.key[0]

    @property
    def structured(self) -> bool:
        return self.key[0] in ("list", "paragraph")


def all_keys() -> list[PromptKey]:
    """Every prompt key of the domain, in a fixed order."""
    keys: list[PromptKey] = []
    for t in range(len(TOPICS)):
        keys += [("list", t, p, n) for p in range(len(LIST_PHRASINGS)) for n in LIST_COUNTS]
        keys += [("paragraph", t, p, k) for p in range(len(PARAGRAPH_PHRASINGS)) for k in PARAGRAPH_COUNTS]
        keys += [("plain", t, p, 0) for p in range(len(PLAIN_TOPIC_PHRASINGS))]
    keys += [("smalltalk", -1, p, 0) for p in range(len(SMALL_TALK))]
    return keys


def heldout_keys(seed: int) -> list[PromptKey]:
    """The held-out prompt keys (see the module docstring), in a fixed order."""
    rng = random.Random(seed + 1)
    out: list[PromptKey] = []
    for t in range(len(TOPICS)):
        lists = [("list", t, p, n) for p in range(len(LIST_PHRASINGS)) for n in LIST_COUNTS]
        paras = [("paragraph", t, p, k) for p in range(len(PARAGRAPH_PHRASINGS)) for k in PARAGRAPH_COUNTS]
        out += sorted(rng.sample(lists, 2)) + [rng.choice(paras)]
    plains = [("plain", t, p, 0) for t in range(len(TOPICS)) for p in range(len(PLAIN_TOPIC_PHRASINGS))]
    out += sorted(rng.sample(plains, 8))
    return out


def prompt_for(key: PromptKey) -> str:
    """The user prompt of a key."""
    kind, t, p, n = key
    if kind == "smalltalk":
        return SMALL_TALK[p][0]
    g, v, _ = TOPICS[t]
    if kind == "list":
        return LIST_PHRASINGS[p][0].format(n=n, g=g, v=v)
    if kind == "paragraph":
        return PARAGRAPH_PHRASINGS[p].format(k=_COUNT_WORDS[n], g=g)
    if kind == "plain":
        return PLAIN_TOPIC_PHRASINGS[p][0].format(g=g)
    raise ValueError(f"unknown prompt kind {kind!r}")


def _lower_title(title: str) -> str:
    return title.lower()


def answer_for(key: PromptKey, rng: random.Random) -> str:
    """A random answer to a key's prompt (items drawn from `rng`)."""
    kind, t, p, n = key
    if kind == "smalltalk":
        return SMALL_TALK[p][1]
    g, v, items = TOPICS[t]
    if kind == "plain":
        title, d1, d2 = items[rng.randrange(len(items))]
        return PLAIN_TOPIC_PHRASINGS[p][1].format(t=_lower_title(title), d=f"{d1} {d2}")
    chosen = [items[i] for i in sorted(rng.sample(range(len(items)), n))]
    if kind == "list":
        head = LIST_PHRASINGS[p][1].format(n=n, g=g, v=v)
        body = [f"{i}. {title}: {d1} {d2}" for i, (title, d1, d2) in enumerate(chosen, 1)]
        return "\n\n".join([head] + body)
    if kind == "paragraph":
        head = PARAGRAPH_INTRO.format(g=g)
        body = [f"{ORDINALS[i]}, {_lower_title(title)}. {d1} {d2}" for i, (title, d1, d2) in enumerate(chosen)]
        return "\n\n".join([head] + body)
    raise ValueError(f"unknown prompt kind {kind!r}")


def generate(
    seed: int = 0,
    *,
    n_list: int = 1000,
    n_paragraph: int = 600,
    n_plain: int = 600,
    exclude: set[PromptKey] | frozenset[PromptKey] = frozenset(),
) -> list[Sample]:
    """Draw samples with `random.Random(seed)`; keys in `exclude` are never used.

    Keys are drawn uniformly within each kind; small talk makes up a quarter of the
    plain samples. The result is shuffled.

    Raises:
        ValueError: a count is negative, or `exclude` leaves no key of a requested kind.
    """
    for name, val in (("n_list", n_list), ("n_paragraph", n_paragraph), ("n_plain", n_plain)):
        if val < 0:
            raise ValueError(f"{name} must be >= 0, got {val}")
    rng = random.Random(seed)
    pool = [k for k in all_keys() if k not in exclude]
    by_kind = {kind: [k for k in pool if k[0] == kind] for kind in ("list", "paragraph", "plain", "smalltalk")}
    n_small = n_plain // 4
    wanted = (("list", n_list), ("paragraph", n_paragraph), ("plain", n_plain - n_small), ("smalltalk", n_small))
    out: list[Sample] = []
    for kind, count in wanted:
        if count and not by_kind[kind]:
            raise ValueError(f"no {kind} prompt keys left after excluding the held-out ones")
        for _ in range(count):
            key = rng.choice(by_kind[kind])
            out.append(Sample(key, prompt_for(key), answer_for(key, rng)))
    rng.shuffle(out)
    return out


def to_record(sample: Sample, index: int) -> dict[str, Any]:
    """A ShareGPT record for a sample."""
    kind, t, p, n = sample.key
    return {
        "id": f"demo-{index:05d}",
        "conversations": [{"from": "human", "value": sample.prompt}, {"from": "gpt", "value": sample.answer}],
        "meta": {"kind": kind, "topic": t, "phrasing": p, "count": n},
    }


def heldout_records(seed: int) -> list[dict[str, Any]]:
    """The held-out prompts, each with one reference answer and a `structured` flag."""
    rng = random.Random(seed + 2)
    out = []
    for i, key in enumerate(heldout_keys(seed)):
        kind, t, p, n = key
        out.append({
            "id": f"heldout-{i:03d}",
            "prompt": prompt_for(key),
            "structured": kind in ("list", "paragraph"),
            "kind": kind,
            "topic": TOPICS[t][0] if t >= 0 else None,
            "count": n,
            "reference": answer_for(key, rng),
        })
    return out


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write rows as deterministic JSONL."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def tokenizer_texts(samples: list[Sample]) -> Iterator[str]:
    """Texts to train a tokenizer on: each sample's prompt in the template, and its answer."""
    for s in samples:
        yield vicuna_v1_1_prompt(s.prompt)
        yield " " + s.answer
