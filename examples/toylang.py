"""Generate a small toy world, a training corpus about it, and a held-out lm-eval task.

The world is a set of made-up people, each with five attributes (home region,
trade, pet, pet colour, favourite food). The corpus states every fact many
times in varied phrasings. The task asks about the same facts with question
phrasings that never occur in the corpus, as a 4-way multiple choice, so a
model scores above chance (25%) only if it has learned the facts.

    python examples/toylang.py --seed 0 --out OUT

writes OUT/world.json, OUT/corpus.txt, OUT/prompts.txt and
OUT/task/{toyfacts.yaml,toyfacts.jsonl}. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

VALUES = {
    "home": ["north", "south", "east", "west", "coast", "hills"],
    "trade": ["baker", "smith", "farmer", "healer", "sailor", "weaver", "hunter", "potter"],
    "pet": ["cat", "dog", "goat", "fox", "horse", "hen"],
    "color": ["red", "blue", "green", "white", "black", "yellow"],
    "food": ["apples", "bread", "fish", "rice", "plums", "cheese", "soup", "honey"],
}

# The corpus states each fact in these phrasings: {p} is the person, {v} the
# value, {pet} the person's pet (colour sentences name the animal).
STATEMENTS = {
    "home": [
        "{p} lives in the {v}.",
        "the home of {p} is in the {v}.",
        "{p} comes from the {v}.",
        "in the {v} you can find {p}.",
    ],
    "trade": [
        "{p} works as a {v}.",
        "{p} is a {v}.",
        "the job of {p} is {v}.",
        "every day {p} goes to work as a {v}.",
    ],
    "pet": [
        "{p} has a {v}.",
        "the pet of {p} is a {v}.",
        "{p} keeps a {v} at home.",
    ],
    "color": [
        "the {pet} of {p} is {v}.",
        "{p} has a {v} {pet}.",
        "the {v} {pet} belongs to {p}.",
    ],
    "food": [
        "{p} likes to eat {v}.",
        "the favorite food of {p} is {v}.",
        "{p} eats {v} every morning.",
    ],
}

# ...and asks for it as "q: {opener}{question}? a: {v}." Many wordings teach
# the model to answer about the person named, whatever the words around the
# name, so that the task's unseen wordings work too.
QUESTIONS = {
    "home": [
        "where does {p} live",
        "where is the home of {p}",
        "{p} comes from where",
        "in what region does {p} live",
        "what place is {p} from",
    ],
    "trade": [
        "what does {p} do",
        "what is the job of {p}",
        "{p} works as what",
        "what work does {p} do",
        "what is {p} by job",
    ],
    "pet": [
        "what animal does {p} keep",
        "what is the pet of {p}",
        "{p} has what pet",
        "what animal lives with {p}",
        "what kind of pet does {p} have",
    ],
    "color": [
        "what color is the {pet} of {p}",
        "the {pet} of {p} has what color",
        "what color is the pet of {p}",
        "{p} has a {pet} of what color",
        "what is the color of the {pet} of {p}",
    ],
    "food": [
        "what does {p} like to eat",
        "what is the favorite food of {p}",
        "{p} eats what every morning",
        "what food does {p} love",
        "what does {p} eat most",
    ],
}
OPENERS = ["", "", "tell me, ", "do you know ", "say, ", "so ", "and ", "now, "]
QUESTION_SHARE = 0.5

# Held-out question phrasings for the task: the corpus never asks this way
# (it never even uses "which"). The answer is the continuation " {v}" after "a:".
TASK_TEMPLATES = {
    "home": "q: which part of the land is home to {p}? a:",
    "trade": "q: which trade does {p} follow? a:",
    "pet": "q: which creature belongs to {p}? a:",
    "color": "q: which shade has the {pet} owned by {p}? a:",
    "food": "q: which dish makes {p} happy? a:",
}

PROMPTS = [
    "{p} lives in the",
    "the pet of {p} is a",
    "{p} works as a",
    "the {pet} of {p} is",
    "{p} likes to eat",
    "q: where does {p} live? a:",
    "q: what does {p} like to eat? a:",
    "q: what color is the {pet} of {p}? a:",
]

CONSONANTS = "bdgklmnprstvz"
VOWELS = "aeiou"
FACTS_PER_LINE = (2, 5)


def make_people(rng: random.Random, count: int) -> list[str]:
    """Distinct made-up names of two or three syllables, none an English word of ours."""
    taken = {word for words in VALUES.values() for word in words}
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_world(rng: random.Random, people: int) -> dict[str, dict[str, str]]:
    return {name: {attr: rng.choice(values) for attr, values in VALUES.items()} for name in make_people(rng, people)}


def fill(template: str, person: str, facts: dict[str, str], value: str = "") -> str:
    return template.format(p=person, v=value, pet=facts["pet"])


def phrase(rng: random.Random, attr: str, person: str, facts: dict[str, str]) -> str:
    """One fact as a statement or as a question with its answer, in a random wording."""
    if rng.random() < QUESTION_SHARE:
        question = fill(rng.choice(QUESTIONS[attr]), person, facts)
        return f"q: {rng.choice(OPENERS)}{question}? a: {facts[attr]}."
    return fill(rng.choice(STATEMENTS[attr]), person, facts, facts[attr])


def make_corpus(rng: random.Random, world: dict[str, dict[str, str]], target_bytes: int) -> str:
    """Lines of 2-5 facts about one person, each in a random phrasing, until target_bytes."""
    people = sorted(world)
    lines: list[str] = []
    size = 0
    while size < target_bytes:
        person = rng.choice(people)
        facts = world[person]
        attrs = rng.sample(sorted(VALUES), rng.randint(*FACTS_PER_LINE))
        line = " ".join(phrase(rng, a, person, facts) for a in attrs)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def make_task(rng: random.Random, world: dict[str, dict[str, str]]) -> list[dict]:
    """One 4-way question per fact; distractors are other values of the same attribute."""
    docs = []
    for person in sorted(world):
        facts = world[person]
        for attr in VALUES:
            truth = facts[attr]
            wrong = rng.sample([v for v in VALUES[attr] if v != truth], 3)
            choices = wrong + [truth]
            rng.shuffle(choices)
            docs.append(
                {
                    "question": fill(TASK_TEMPLATES[attr], person, facts),
                    "choices": choices,
                    "answer": choices.index(truth),
                    "person": person,
                    "attribute": attr,
                }
            )
    return docs


TASK_YAML = """\
task: toyfacts
dataset_path: json
dataset_kwargs:
  data_files:
    test: toyfacts.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=80, help="five facts per person")
    parser.add_argument("--corpus-kb", type=int, default=600)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    world = make_world(rng, args.people)
    corpus = make_corpus(rng, world, args.corpus_kb * 1000)
    docs = make_task(rng, world)
    prompt_people = rng.sample(sorted(world), len(PROMPTS))
    prompts = [fill(t, p, world[p]) for t, p in zip(PROMPTS, prompt_people)]

    out: Path = args.out
    (out / "task").mkdir(parents=True, exist_ok=True)
    (out / "world.json").write_text(json.dumps(world, indent=1, sort_keys=True) + "\n")
    (out / "corpus.txt").write_text(corpus)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (out / "task" / "toyfacts.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "task" / "toyfacts.yaml").write_text(TASK_YAML)
    facts = len(world) * len(VALUES)
    print(f"{len(world)} people, {facts} facts, corpus {len(corpus) / 1000:.0f} KB, task {len(docs)} questions")


if __name__ == "__main__":
    main()
