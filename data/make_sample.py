"""Generate the bundled sample data: small, made-up tasks with short answers that can be checked exactly.

    python data/make_sample.py              # writes data/sample/ and data/eval/
    python data/make_sample.py --out DIR    # writes DIR/sample/ and DIR/eval/ (the tests use this)

Everything is generated from a fixed seed, so the output is the same bytes every time; nothing is copied from
elsewhere. Every answer is short and exactly checkable, so a tiny model (4 layers, 128 wide) shows progress
within the default 1,000 steps (letter counting first; the arithmetic and word tasks take longer):

- add / sub: one- and two-digit addition and subtraction (results never negative);
- larger: which of two numbers is larger;
- upper / reverse / count / repeat: upper-case, reverse, count the letters of, or repeat a made-up word.

Files written:
- sample/instructions.jsonl: Alpaca-style records (`instruction`, `input`, `output`, plus `task`, which the
  render stage ignores and evaluation can use to score per task);
- sample/chat.jsonl: multi-turn conversations (`messages`), whose follow-up turns work on the previous answer;
- sample/notes.txt: plain text paragraphs (counting, number names, the alphabet);
- eval/heldout.jsonl: held-out instruction records for exact-match scoring. Their problems (task and operands)
  never occur in the training files in any phrasing, and their made-up words are not used in training at all.
"""

import argparse
import json
import random
import re
from pathlib import Path

SEED = 20240611
TRAIN_INSTRUCTIONS = 6000
TRAIN_CONVERSATIONS = 1500
HELDOUT_PER_TASK = 30
TEXT_PARAGRAPHS = 300
TASKS = ("add", "sub", "larger", "upper", "reverse", "count", "repeat")
WORD_TASKS = ("upper", "reverse", "count", "repeat")

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# (instruction, input) phrasings per task; {a}, {b} are numbers, {w} a word.
PHRASINGS = {
    "add": [("What is {a} + {b}?", ""), ("Add the two numbers.", "{a} and {b}"), ("Compute {a} plus {b}.", ""),
            ("What is the sum?", "{a} + {b}")],
    "sub": [("What is {a} - {b}?", ""), ("Subtract the second number from the first.", "{a} and {b}"),
            ("Compute {a} minus {b}.", ""), ("What is the difference?", "{a} - {b}")],
    "larger": [("Which number is larger?", "{a} or {b}"), ("Which is bigger, {a} or {b}?", ""),
               ("Pick the larger number.", "{a}, {b}")],
    "upper": [("Write the word in capital letters.", "{w}"), ("Upper-case this word: {w}", ""),
              ("Convert to upper case.", "{w}")],
    "reverse": [("Reverse the letters of the word.", "{w}"), ("Spell {w} backwards.", ""),
                ("Write this word in reverse.", "{w}")],
    "count": [("How many letters are in the word?", "{w}"), ("Count the letters in {w}.", ""),
              ("How long is this word?", "{w}")],
    "repeat": [("Repeat the word.", "{w}"), ("Say {w} again.", ""), ("Copy this word exactly.", "{w}")],
}
SYSTEM_PROMPTS = ["You are a careful assistant. Answer with the result only.", "Answer briefly."]
FOLLOW_UPS = {  # (question, operation on the previous answer); the answer stays a number or a word
    "number": [("Now add {c}.", "add"), ("Now subtract {c}.", "sub"), ("Add {c} to that.", "add")],
    "word": [("Now write it in capital letters.", "upper"), ("Now reverse it.", "reverse"),
             ("How many letters does it have?", "count")],
}
NOTES_WORDS = "Counting up down from is written Letters in order In capitals"  # the fixed words of notes()


def main() -> None:
    """Write the sample and held-out files under --out (default: the folder holding this script)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write sample/ and eval/ into")
    write_all(parser.parse_args().out)


def write_all(out: Path) -> None:
    """Generate everything from SEED and write it under `out`."""
    words = made_up_words(_rng("words"), 1200)
    held_count = HELDOUT_PER_TASK * len(WORD_TASKS)
    heldout_words, train_words = words[:held_count], words[held_count:]
    heldout = heldout_problems(_rng("heldout"), heldout_words)
    reserved = {problem_key(p) for p in heldout}
    rng = _rng("instructions")
    instructions = [instruction_record(rng, problem_not_in(rng, reserved, train_words))
                    for _ in range(TRAIN_INSTRUCTIONS)]
    rng = _rng("chat")
    conversations = [conversation(rng, reserved, train_words) for _ in range(TRAIN_CONVERSATIONS)]
    _write_jsonl(out / "sample" / "instructions.jsonl", instructions)
    _write_jsonl(out / "sample" / "chat.jsonl", conversations)
    _write_text(out / "sample" / "notes.txt", "\n\n".join(notes(_rng("notes"))) + "\n")
    rng = _rng("heldout phrasing")
    rng.shuffle(heldout)  # tasks mixed, so the first N prompts (evaluate.num_prompts) are a fair sample
    _write_jsonl(out / "eval" / "heldout.jsonl", [instruction_record(rng, p) for p in heldout])


def _rng(part: str) -> random.Random:
    """A generator of its own for each part, so changing one part leaves the others' bytes alone."""
    return random.Random(f"{SEED}/{part}")  # str seeds are hashed with SHA-512: the same on every run


def made_up_words(rng: random.Random, n: int) -> list[str]:
    """n distinct pronounceable made-up words of 3 to 6 letters, none of them a word the data uses otherwise."""
    words: list[str] = []
    seen = set(_fixed_words())  # e.g. "five" or "zero" would leak held-out words into the training text
    while len(words) < n:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
        word = word[: rng.randint(3, len(word))]
        if word not in seen and word[::-1] not in seen:  # a reversed training word is never a held-out one
            seen.add(word)
            words.append(word)
    return words


def _fixed_words() -> set[str]:
    """Every word of the phrasings, number names and notes, in lower case."""
    texts = [t for pairs in PHRASINGS.values() for pair in pairs for t in pair] + SYSTEM_PROMPTS + ONES + TENS
    texts += [q for pairs in FOLLOW_UPS.values() for q, _ in pairs] + [NOTES_WORDS]
    return set(re.findall(r"[a-z]+", " ".join(texts).lower()))


def random_problem(rng: random.Random, words: list[str], task: str | None = None) -> dict:
    """One problem: {"task", "a", "b"} for numbers or {"task", "w"} for words."""
    task = task or rng.choice(TASKS)
    if task in WORD_TASKS:
        return {"task": task, "w": rng.choice(words)}
    a, b = _number(rng), _number(rng)
    if task == "sub" and b > a:
        a, b = b, a
    while task == "larger" and a == b:
        b = _number(rng)
    return {"task": task, "a": a, "b": b}


def _number(rng: random.Random) -> int:
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def problem_key(problem: dict) -> tuple:
    """What makes two problems the same, whatever the phrasing."""
    return tuple(sorted(problem.items()))


def answer(problem: dict) -> str:
    """The exact expected answer."""
    task = problem["task"]
    if task in WORD_TASKS:
        w = problem["w"]
        return {"upper": w.upper(), "reverse": w[::-1], "count": str(len(w)), "repeat": w}[task]
    a, b = problem["a"], problem["b"]
    return str({"add": a + b, "sub": a - b, "larger": max(a, b)}[task])


def heldout_problems(rng: random.Random, words: list[str]) -> list[dict]:
    """HELDOUT_PER_TASK distinct problems per task; word tasks use only the reserved words."""
    problems, seen = [], set()
    for task in TASKS:
        count = 0
        while count < HELDOUT_PER_TASK:
            problem = random_problem(rng, words, task)
            if problem_key(problem) not in seen:
                seen.add(problem_key(problem))
                problems.append(problem)
                count += 1
    return problems


def problem_not_in(rng: random.Random, reserved: set, words: list[str], task: str | None = None) -> dict:
    """A random problem that is not one of the held-out ones."""
    while True:
        problem = random_problem(rng, words, task)
        if problem_key(problem) not in reserved:
            return problem


def phrase(rng: random.Random, problem: dict) -> tuple[str, str]:
    """(instruction, input) for a problem, in one of its task's phrasings."""
    instruction, input = rng.choice(PHRASINGS[problem["task"]])
    values = {k: v for k, v in problem.items() if k != "task"}
    return instruction.format(**values), input.format(**values)


def instruction_record(rng: random.Random, problem: dict) -> dict:
    """An Alpaca-style record for a problem."""
    instruction, input = phrase(rng, problem)
    return {"instruction": instruction, "input": input, "output": answer(problem), "task": problem["task"]}


def conversation(rng: random.Random, reserved: set, words: list[str]) -> dict:
    """A multi-turn chat: a first question, then one or two follow-ups on the previous answer."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    problem = problem_not_in(rng, reserved, words)
    instruction, input = phrase(rng, problem)
    messages += _exchange(f"{instruction}\n\n{input}" if input else instruction, answer(problem))
    for _ in range(rng.randint(1, 2)):
        question, problem = _follow_up(rng, reserved, problem)
        messages += _exchange(question, answer(problem))
    return {"messages": messages}


def _follow_up(rng: random.Random, reserved: set, previous: dict) -> tuple[str, dict]:
    """A question about the previous answer and the problem it amounts to (never a held-out one)."""
    last = answer(previous)
    while True:
        if previous["task"] in WORD_TASKS and previous["task"] != "count":
            question, task = rng.choice(FOLLOW_UPS["word"])
            if previous["task"] == "upper" and task != "count":
                continue  # "reverse it" after upper-casing would be ambiguous about case
            problem = {"task": task, "w": last.lower()}
        else:
            question, task = rng.choice(FOLLOW_UPS["number"])
            c = rng.randint(1, 9)
            if task == "sub" and c > int(last):
                continue
            problem = {"task": task, "a": int(last), "b": c}
            question = question.format(c=c)
        if problem_key(problem) not in reserved:
            return question, problem


def _exchange(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def number_name(n: int) -> str:
    """English name of 0..99."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def notes(rng: random.Random) -> list[str]:
    """Plain text paragraphs about counting, number names and letters (no task with an answer in it)."""
    paragraphs = []
    for _ in range(TEXT_PARAGRAPHS):
        kind = rng.choice(("up", "down", "names", "alphabet"))
        start = rng.randint(0, 90)
        if kind == "up":
            paragraphs.append(f"Counting up from {start}:\n" + ", ".join(str(n) for n in range(start, start + 10))
                              + ".")
        elif kind == "down":
            top = start + 9
            paragraphs.append(f"Counting down from {top}:\n" + ", ".join(str(n) for n in range(top, start - 1, -1))
                              + ".")
        elif kind == "names":
            numbers = sorted(rng.sample(range(100), 3))
            paragraphs.append("\n".join(f"{number_name(n).capitalize()} is written {n}." for n in numbers))
        else:
            first = rng.randint(0, 20)
            letters = "abcdefghijklmnopqrstuvwxyz"[first:first + 6]
            paragraphs.append(f"Letters in order: {' '.join(letters)}.\n"
                              f"In capitals: {' '.join(letters.upper())}.")
    return paragraphs


def _write_jsonl(path: Path, records: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    main()
