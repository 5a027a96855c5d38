"""Generating the tiny world: task examples, a story grammar, the BPE tokenizer, and the
command that rebuilds the shipped assets. Deterministic from a seed (same bytes on every
build); licensed with the repository (Apache-2.0). Not imported by training or evaluation::

    python -m twotower_train.tiny_world.build build [--out DIR] [--seed N]
    python -m twotower_train.tiny_world.build stats    # sizes and token counts
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from twotower_train.tiny_world import (
    ASSETS_DIR,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TASKS,
    TEST_TASKS_FILE,
    TEST_TEXT_FILE,
    TRAIN_FILE,
    VOCAB_SIZE,
    corpus_stats,
)

TRAIN_EXAMPLES_PER_TASK = 80_000
TRAIN_TEXT_WORDS = 4_000_000
TEST_EXAMPLES_PER_TASK = 200
TEST_TEXT_PARAGRAPHS = 1_000

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# ---------------------------------------------------------------------------------------------
# Tasks. Every prompt is "<task> <arguments> =" and every answer starts with a space, so the
# tokens of the prompt are a prefix of the tokens of prompt + answer. Letters and numbers are
# separated by spaces so that BPE keeps each letter its own token; digits are split by the
# tokenizer anyway.
# ---------------------------------------------------------------------------------------------


def _random_letters(rng: random.Random, min_len: int = 3, max_len: int = 10) -> list[str]:
    return [rng.choice(_LETTERS) for _ in range(rng.randint(min_len, max_len))]


def _random_operand(rng: random.Random) -> int:
    """1, 2 or 3 digits with equal probability, then uniform within that digit count."""
    n_digits = rng.randint(1, 3)
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(low, 10**n_digits - 1)


def make_task_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of `task`; the training text is ``prompt + answer``.

    Formats (one example each)::

        add      "add 123 45 ="                 " 168"
        copy     "copy h e l l o ="             " h e l l o"
        reverse  "reverse h e l l o ="          " o l l e h"
        sort     "sort 5 3 9 3 ="               " 3 3 5 9"
        recall   "recall k:7 b:2 x:5 ? b ="     " 2"
    """
    if task == "add":
        a, b = _random_operand(rng), _random_operand(rng)
        return f"add {a} {b} =", f" {a + b}"
    if task == "copy":
        letters = _random_letters(rng)
        return f"copy {' '.join(letters)} =", f" {' '.join(letters)}"
    if task == "reverse":
        letters = _random_letters(rng)
        return f"reverse {' '.join(letters)} =", f" {' '.join(reversed(letters))}"
    if task == "sort":
        numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 8))]
        return (
            f"sort {' '.join(map(str, numbers))} =",
            f" {' '.join(map(str, sorted(numbers)))}",
        )
    if task == "recall":
        keys = rng.sample(_LETTERS, rng.randint(3, 6))
        values = [rng.randint(0, 9) for _ in keys]
        query = rng.randrange(len(keys))
        pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
        return f"recall {pairs} ? {keys[query]} =", f" {values[query]}"
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ---------------------------------------------------------------------------------------------
# Story paragraphs from a small probabilistic grammar (a few hundred words, ~20 sentence
# shapes). Each paragraph follows one protagonist and one companion in one place.
# ---------------------------------------------------------------------------------------------


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


def _verb_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """ "find:found lose:lost" -> (("find", "found"), ("lose", "lost")): (base, past)."""
    return tuple(tuple(pair.split(":")) for pair in text.split())


_GIRLS = _words(
    "Anna Lily Mia Emma Sara Lucy Nora Ella Zoe Ruby Maya Rosa Ivy Clara Hana Lena Amy Jade "
    "Kate Tess"
)
_BOYS = _words(
    "Tom Ben Sam Leo Max Jack Noah Finn Owen Hugo Omar Luke Adam Eli Theo Ravi Paul Dan Kai Tim"
)
_RELATIVES = _words(
    "mother father grandmother grandfather sister brother aunt uncle cousin teacher friend neighbor"
)
_HELPERS = _words("baker farmer doctor fisherman painter gardener librarian shopkeeper")
_ANIMALS = _words(
    "dog cat bird fox rabbit horse cow duck goat sheep mouse owl frog bear deer wolf squirrel "
    "turtle fish bee pig hen lamb kitten puppy donkey beaver hedgehog crow swan"
)
_PLACES = _words(
    "park garden forest river beach market school library kitchen farm hill lake village "
    "city bakery station field bridge cave castle harbor meadow museum zoo playground shop "
    "barn island valley mountain road pond orchard street"
)
_LANDMARKS = _words(
    "tree fence door window gate bench wall rock table bed bush path stairs well tent"
)
_OBJECTS = _words(
    "ball book kite hat box key map cup lamp boat bike coin shell stone flower leaf letter "
    "basket blanket bell candle clock drum feather glove jar ladder mirror necklace pencil "
    "picture ribbon rope scarf shoe spoon stick toy umbrella wagon whistle bucket bottle "
    "brush chair puzzle robot doll train sock bag ring note button paper crayon marble "
    "shovel tray"
)
_UNCOUNTABLE_FOODS = frozenset(_words("bread soup cheese honey jam milk rice tea"))
_FOODS = _words(
    "apple bread cake cookie soup cheese pie pear plum carrot egg honey jam milk orange "
    "peach rice sandwich tea berry banana lemon muffin pancake potato"
)
_COLORS = _words("red blue green yellow orange purple pink brown black white gray golden")
_OBJECT_ADJECTIVES = _words(
    "big small old new bright dark soft heavy light shiny tiny huge warm cold round long "
    "short strange beautiful broken wet dry clean dirty little pretty funny special smooth "
    "rough"
)
_CHARACTER_ADJECTIVES = _words(
    "kind brave clever shy curious sleepy grumpy gentle cheerful lazy busy proud silly wise "
    "friendly quiet noisy patient careful hungry"
)
_FEELINGS = _words(
    "happy sad excited tired scared surprised proud worried angry calm lonely glad nervous "
    "hungry thirsty confused bored grateful hopeful sleepy"
)
_WEATHER = _words(
    "sunny rainy windy cloudy cold warm snowy foggy bright stormy hot cool gray quiet"
)
_TIMES = _words(
    "One day|In the morning|After lunch|That evening|At night|On Sunday|Last summer|"
    "Early the next day|Before dinner|In the afternoon|On a cold winter day|At noon|"
    "After school|On a rainy day|Long ago|Every morning|One spring day|Later that week",
    sep="|",
)
_ADVERBS = _words(
    "quickly slowly happily quietly carefully loudly suddenly gently softly finally "
    "proudly sadly bravely calmly eagerly politely kindly patiently boldly merrily"
)
_NUMBER_WORDS = _words("two three four five six seven eight nine ten many some")
_PREPOSITIONS = _words(
    "near|under|behind|beside|inside|next to|on top of|in front of|far from", sep="|"
)
_OBJECT_VERBS = _verb_pairs(
    "find:found lose:lost carry:carried paint:painted drop:dropped open:opened clean:cleaned "
    "fix:fixed hide:hid hold:held buy:bought sell:sold share:shared want:wanted watch:watched "
    "take:took make:made bring:brought break:broke wash:washed throw:threw catch:caught "
    "push:pushed pull:pulled kick:kicked draw:drew fold:folded wrap:wrapped count:counted "
    "borrow:borrowed"
)
_ACTION_VERBS = _verb_pairs(
    "run:ran jump:jumped laugh:laughed smile:smiled sleep:slept sing:sang dance:danced "
    "wait:waited cry:cried shout:shouted whisper:whispered play:played rest:rested "
    "walk:walked climb:climbed swim:swam hurry:hurried listen:listened nod:nodded sigh:sighed "
    "hop:hopped sit:sat read:read think:thought"
)
_FOOD_VERBS = _verb_pairs(
    "eat:ate cook:cooked bake:baked share:shared taste:tasted buy:bought pick:picked"
)
_MOVE_VERBS = _words("walked ran went hurried rode wandered skipped raced drove")
_SAY_VERBS = _words("said asked shouted whispered replied called answered laughed")
_COMPARATIVES = _words(
    "bigger smaller faster slower older younger louder quieter stronger softer taller"
)
_ANIMAL_SOUNDS = {
    "dog": "barked",
    "puppy": "barked",
    "cat": "meowed",
    "kitten": "purred",
    "bird": "chirped",
    "mouse": "squeaked",
    "duck": "quacked",
    "bear": "growled",
    "owl": "hooted",
    "bee": "buzzed",
    "wolf": "howled",
    "cow": "mooed",
    "sheep": "bleated",
    "lamb": "bleated",
    "goat": "bleated",
    "horse": "neighed",
    "frog": "croaked",
    "crow": "cawed",
    "pig": "grunted",
    "hen": "clucked",
    "donkey": "brayed",
}
_IRREGULAR_PLURALS = {
    "mouse": "mice",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "leaf": "leaves",
    "wolf": "wolves",
    "scarf": "scarves",
    "shelf": "shelves",
    "puppy": "puppies",
    "berry": "berries",
    "cherry": "cherries",
    "library": "libraries",
}


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "sh", "ch", "x")) or noun in ("potato", "tomato"):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _some(food: str) -> str:
    """ "some bread" but "some apples"."""
    return food if food in _UNCOUNTABLE_FOODS else _plural(food)


def _a(phrase: str) -> str:
    """Indefinite article: "a cat", "an apple"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _Character(NamedTuple):
    name: str  # "Anna", or "her mother"
    subject: str  # she / he / they
    object: str  # her / him / them
    possessive: str  # her / his / their


def _random_person(rng: random.Random, exclude: str = "") -> _Character:
    while True:
        if rng.random() < 0.5:
            person = _Character(rng.choice(_GIRLS), "she", "her", "her")
        else:
            person = _Character(rng.choice(_BOYS), "he", "him", "his")
        if person.name != exclude:
            return person


def _story_paragraph(rng: random.Random) -> str:
    """A paragraph of 3-7 sentences about one protagonist, one companion and one place."""
    hero = _random_person(rng)
    if rng.random() < 0.6:
        friend = _random_person(rng, exclude=hero.name)
        friend_name = friend.name
    else:
        relative = rng.choice(_RELATIVES)
        friend = _Character(f"{hero.possessive} {relative}", "they", "them", "their")
        friend_name = f"{hero.name}'s {relative}" if rng.random() < 0.3 else friend.name
    place = rng.choice(_PLACES)
    animal = rng.choice(_ANIMALS)
    thing = rng.choice(_OBJECTS)
    thing_adjective = rng.choice(_OBJECT_ADJECTIVES + _COLORS)
    food = rng.choice(_FOODS)

    def hero_ref() -> str:
        return hero.name if rng.random() < 0.45 else hero.subject.capitalize()

    def time() -> str:
        return rng.choice(_TIMES)

    def quote() -> str:
        return rng.choice(
            [
                f"Can we go to the {rng.choice(_PLACES)}?",
                f"Look at the {rng.choice(_OBJECT_ADJECTIVES + _COLORS)} {animal}!",
                f"I want some {_some(food)}.",
                f"Where is my {thing}?",
                f"Let us {rng.choice(['play', 'go home', 'eat', 'rest', 'sing', 'read'])}.",
                f"Thank you, {friend.name if friend.subject != 'they' else 'my friend'}.",
                f"The {thing} is {rng.choice(_OBJECT_ADJECTIVES + _COLORS)}.",
                f"I am so {rng.choice(_FEELINGS)}!",
                f"Do you like the {animal}?",
                "Yes, I do.",
                "No, not today.",
                f"We can {rng.choice(_OBJECT_VERBS)[0]} it together.",
            ]
        )

    def reason() -> str:
        return rng.choice(
            [
                f"the {thing} was {rng.choice(_OBJECT_ADJECTIVES)}",
                f"{friend.name} was late",
                f"it was {rng.choice(_WEATHER)} outside",
                f"{hero.possessive} {thing} was lost",
                f"the {animal} {rng.choice(_ACTION_VERBS)[1]} away",
                f"{friend.name} {rng.choice(_FOOD_VERBS)[1]} the last {food}",
                f"there was no {food} left",
                f"the {place} was closed",
            ]
        )

    opening = rng.choice(
        [
            f"{time()}, {hero.name} {rng.choice(_MOVE_VERBS)} to the {place}.",
            f"{hero.name} was {_a(rng.choice(_CHARACTER_ADJECTIVES))} "
            f"{'girl' if hero.subject == 'she' else 'boy'} who loved {_plural(animal)}.",
            f"{time()}, {hero.name} and {friend.name} went to the {place} together.",
            f"There was once {_a(rng.choice(_CHARACTER_ADJECTIVES))} "
            f"{'girl' if hero.subject == 'she' else 'boy'} named {hero.name}.",
            f"The weather was {rng.choice(_WEATHER)}, so {hero.name} stayed at the {place}.",
        ]
    )

    def middle() -> str:
        shape = rng.randrange(19)
        if shape == 0:
            where = rng.choice(_PREPOSITIONS)
            return f"{hero_ref()} found {_a(thing_adjective + ' ' + thing)} {where} the {rng.choice(_LANDMARKS)}."
        if shape == 1:
            return f"The {animal} {rng.choice(_ACTION_VERBS)[1]} {rng.choice(_ADVERBS)}."
        if shape == 2:
            action = rng.choice(["played with", "looked at", "talked about", "laughed at"])
            return f"{hero.name} and {friend.name} {action} the {thing}."
        if shape == 3:
            return f'"{quote()}" {rng.choice(_SAY_VERBS)} {rng.choice([hero.name, friend_name])}.'
        if shape == 4:
            return f"{hero_ref()} felt {rng.choice(_FEELINGS)} because {reason()}."
        if shape == 5:
            return (
                f"When the {animal} {_ANIMAL_SOUNDS.get(animal, 'made a sound')}, "
                f"{hero.name} {rng.choice(_ACTION_VERBS)[1]} {rng.choice(_ADVERBS)}."
            )
        if shape == 6:
            gift = rng.choice([f"some {_some(food)}", f"the {thing}", _a(thing), _a(food)])
            return (
                f"{hero_ref()} gave {friend.object if rng.random() < 0.3 else friend_name} {gift}."
            )
        if shape == 7:
            return (
                f"There were {rng.choice(_NUMBER_WORDS)} {rng.choice(_OBJECT_ADJECTIVES + _COLORS)} "
                f"{_plural(rng.choice(_ANIMALS))} in the {place}."
            )
        if shape == 8:
            first, second = rng.sample(_OBJECT_VERBS, 2)
            return (
                f"{hero_ref()} {first[1]} the {thing} and then {second[1]} it "
                f"{rng.choice(_ADVERBS)}."
            )
        if shape == 9:
            return rng.choice(
                [
                    f"The sky was {rng.choice(_COLORS)} and the air was {rng.choice(_WEATHER)}.",
                    f"It was a {rng.choice(_WEATHER)} day in the {place}.",
                    f"The wind blew {rng.choice(_ADVERBS)} over the {rng.choice(_PLACES)}.",
                ]
            )
        if shape == 10:
            verb = rng.choice(_OBJECT_VERBS)[0]
            return f"{friend_name.capitalize()} asked {hero.name} to {verb} the {thing}."
        if shape == 11:
            (v1, _), (_, p2) = rng.sample(_OBJECT_VERBS, 2)
            other = rng.choice(_OBJECTS)
            return f"{hero_ref()} did not {v1} the {thing}, but {hero.subject} {p2} the {other}."
        if shape == 12:
            a, b = rng.sample(_ANIMALS, 2)
            return f"The {a} was {rng.choice(_COMPARATIVES)} than the {b}."
        if shape == 13:
            return (
                f"{hero_ref()} counted {rng.choice(_NUMBER_WORDS[:-2])} "
                f"{_plural(food)} in the basket."
            )
        if shape == 14:
            c1, c2 = rng.sample(_COLORS, 2)
            return f"{hero_ref()} liked the {c1} {thing} more than the {c2} one."
        if shape == 15:
            verb = rng.choice(_FOOD_VERBS)[1]
            return f"{friend_name.capitalize()} {verb} {_a(food)} for {hero.name}."
        if shape == 16:
            return f"Why was the {animal} so {rng.choice(_FEELINGS)}?"
        if shape == 17:
            helper = rng.choice(_HELPERS)
            return rng.choice(
                [
                    f"The {helper} showed {hero.name} how to {rng.choice(_OBJECT_VERBS)[0]} "
                    f"the {thing}.",
                    f"{hero_ref()} met the {rng.choice(_CHARACTER_ADJECTIVES)} {helper} "
                    f"at the {place}.",
                    f'"Good {rng.choice(["morning", "evening", "day"])}," said the {helper}.',
                ]
            )
        return (
            f"{time()}, {hero.subject} {rng.choice(_MOVE_VERBS)} to the {rng.choice(_PLACES)} "
            f"with {friend.name}."
        )

    closing = rng.choice(
        [
            f"At the end of the day, {hero.name} went home {rng.choice(_ADVERBS)}.",
            f"{hero.name} fell asleep and dreamed about the {rng.choice([animal, thing])}.",
            f"It was the best day {hero.subject} ever had.",
            f"From then on, {hero.name} always kept the {thing} {rng.choice(_PREPOSITIONS)} "
            f"the {rng.choice(_LANDMARKS)}.",
            f"{hero.name} and {friend.name} were {rng.choice(_FEELINGS)}.",
            "The end.",
        ]
    )
    sentences = [opening] + [middle() for _ in range(rng.randint(1, 5))] + [closing]
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# Building the corpus and tokenizer.
# ---------------------------------------------------------------------------------------------


def _unique_task_examples(task: str, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """`count` examples with distinct prompts (the held-out split)."""
    examples: dict[str, str] = {}
    while len(examples) < count:
        prompt, answer = make_task_example(task, rng)
        examples.setdefault(prompt, answer)
    return list(examples.items())


def _write_jsonl_gz(path: Path, records: Iterable[dict]) -> None:
    """gzip with mtime=0 and no file name in the header: same records give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
        io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as text,
    ):
        for record in records:
            text.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _fill_with_reserved_tokens(bpe, vocab_size: int):
    """Pad the vocabulary to exactly `vocab_size` with special ``<|reserved_i|>`` tokens.

    BPE on the tiny world runs out of merges before 2048 (every word becomes one token), and
    a fixed, round vocabulary size keeps model embedding shapes simple. The reserved tokens
    are part of the model vocabulary, so ``tokenizer.vocab_size == len(tokenizer)``.
    """
    from tokenizers import Tokenizer

    n_learned = bpe.get_vocab_size(with_added_tokens=True)
    if n_learned >= vocab_size:
        return bpe
    spec = json.loads(bpe.to_str())
    for token_id in range(n_learned, vocab_size):
        token = f"<|reserved_{token_id - n_learned}|>"
        spec["model"]["vocab"][token] = token_id
        spec["added_tokens"].append(
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    return Tokenizer.from_str(json.dumps(spec))


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with individually split digits and special ids pad=0, eos=1, mask=2.

    Unused ids up to `vocab_size` are filled with ``<|reserved_i|>`` special tokens. Returns a
    ``PreTrainedTokenizerFast`` that adds no special tokens when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe = _fill_with_reserved_tokens(bpe, vocab_size)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(token) == token_id, (token, bpe.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def build(
    out_dir: Path = ASSETS_DIR,
    seed: int = 0,
    *,
    train_examples_per_task: int = TRAIN_EXAMPLES_PER_TASK,
    train_text_words: int = TRAIN_TEXT_WORDS,
    test_examples_per_task: int = TEST_EXAMPLES_PER_TASK,
    test_text_paragraphs: int = TEST_TEXT_PARAGRAPHS,
) -> None:
    """Regenerate corpus and tokenizer under `out_dir`, deterministically from `seed`.

    Writes ``corpus/{train,test_tasks,test_text}.jsonl.gz`` and ``tokenizer/``. The train and
    test splits come from different random streams; train drops any example whose prompt (or
    paragraph) is in test. The keyword sizes exist for quick test builds.
    """
    out_dir = Path(out_dir)
    # One independent stream per split and purpose, all derived from `seed`.
    rng_test_tasks = random.Random(f"tiny_world/{seed}/test_tasks")
    rng_test_text = random.Random(f"tiny_world/{seed}/test_text")
    rng_train_tasks = random.Random(f"tiny_world/{seed}/train_tasks")
    rng_train_text = random.Random(f"tiny_world/{seed}/train_text")
    rng_shuffle = random.Random(f"tiny_world/{seed}/shuffle")

    test_tasks = []
    for task in TASKS:
        for prompt, answer in _unique_task_examples(task, rng_test_tasks, test_examples_per_task):
            test_tasks.append({"task": task, "prompt": prompt, "answer": answer})
    test_prompts = {example["prompt"] for example in test_tasks}

    test_text = []
    while len(test_text) < test_text_paragraphs:
        test_text.append(_story_paragraph(rng_test_text))
    test_paragraphs = set(test_text)

    train = []
    for task in TASKS:
        n_kept = 0
        while n_kept < train_examples_per_task:
            prompt, answer = make_task_example(task, rng_train_tasks)
            if prompt in test_prompts:
                continue
            train.append(
                {
                    "text": prompt + answer,
                    "kind": "task",
                    "task": task,
                    "prompt": prompt,
                    "answer": answer,
                }
            )
            n_kept += 1
    n_words = 0
    while n_words < train_text_words:
        paragraph = _story_paragraph(rng_train_text)
        if paragraph in test_paragraphs:
            continue
        train.append({"text": paragraph, "kind": "text"})
        n_words += len(paragraph.split())
    rng_shuffle.shuffle(train)

    corpus_dir = out_dir / "corpus"
    _write_jsonl_gz(corpus_dir / TRAIN_FILE, train)
    _write_jsonl_gz(corpus_dir / TEST_TASKS_FILE, test_tasks)
    _write_jsonl_gz(corpus_dir / TEST_TEXT_FILE, ({"text": text} for text in test_text))

    tokenizer = train_tokenizer(record["text"] for record in train)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m twotower_train.tiny_world.build")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="regenerate corpus + tokenizer")
    build_parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    build_parser.add_argument("--seed", type=int, default=0)
    stats_parser = commands.add_parser("stats", help="print sizes and token counts")
    stats_parser.add_argument("--dir", type=Path, default=ASSETS_DIR)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, args.seed)
        print(f"wrote tiny world to {args.out}")
    else:
        for key, value in corpus_stats(args.dir).items():
            print(f"{key:40s} {value:,.2f}" if isinstance(value, float) else f"{key:40s} {value:,}")


if __name__ == "__main__":
    main()
