"""The shipped verifiable task: arithmetic questions with one right answer.

A prompt is one user turn in TRL's conversational format, so a chat model sees
it through its own chat template::

    [{"role": "user", "content": "What is 17 + 25? Reply with the number only."}]

The right answer is a number, and a rule checks it: :func:`answer_reward` gives
1.0 when the **last number in the response** (an optional minus sign and
digits, ``-?\\d+``) equals the answer of the **last question in the prompt**,
and 0.0 otherwise, also when the response holds no number. "17 + 25 = 42."
and "The answer is 42" score 1; "42, or maybe 43" scores 0 (its last number is
43). The last number is what a model that works the sum out step by step ends
on; the same rule reads SmolLM2-135M-Instruct's habit of restating the sum
("17 + 25 = 32.") as its answer 32.

Splits, in the formats of :mod:`rlhf_ray.data.formats` (TRL's names):

- ``sft``: ``{"prompt", "completion"}``, the completion one assistant turn
  holding the answer alone (``"42"``);
- ``preference_train`` / ``preference_eval``: ``{"prompt", "chosen",
  "rejected"}``, both assistant turns that restate the sum and answer it
  (``"17 + 25 = 42"``), chosen with the right answer, rejected with a near
  miss (off by one, off by ten, or two digits swapped: the mistakes small
  models make). Restated, as SmolLM2-135M-Instruct tends to answer, the
  pair differs only in the answer. (Measured with plain DPO from the
  instruct model, pairs of either form: DPO lowers both sides' log-probs and
  the model drifts to long "To add 53 and 34, ..." answers that 16 tokens
  cut short; the held-out pass rate fell from 21.9% to 6.2% with bare
  numbers and to 0% with restated sums in 60 steps; DPO-Positive, which
  penalises the chosen answer's log-prob falling, raised it to 75% on the
  restated pairs: the `smol-dpo` preset.)
- ``prompts_train`` / ``prompts_eval``: ``{"prompt"}`` for online RL.

Operands have ``digits`` digits (two by default: 10 to 99); ``operations`` is
any of ``+``, ``-``, ``*``. Held-out questions never occur in a training split.
Everything is deterministic given :class:`ArithmeticConfig`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
QUESTION = "What is {a} {op} {b}? Reply with the number only."
SPLITS = ("sft", "preference_train", "preference_eval", "prompts_train", "prompts_eval")

_QUESTION = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithmeticConfig:
    """Operand size, operations, split sizes and seed of the arithmetic task."""

    seed: int = 0
    """Seeds every random choice; the same config always gives the same rows."""
    digits: int = 2
    """Digits of each operand: 2 asks about 10..99."""
    operations: tuple[str, ...] = ("+",)
    """Any of "+", "-", "*"."""
    n_sft: int = 1000
    """SFT demonstrations."""
    n_pref_train: int = 1000
    """Training preference pairs (right answer against a near miss)."""
    n_pref_eval: int = 64
    """Held-out preference pairs, on held-out questions."""
    n_prompts_train: int = 2000
    """Questions for online RL."""
    n_prompts_eval: int = 64
    """Held-out questions for the pass rate."""

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 6:
            raise ValueError(f"ArithmeticConfig.digits = {self.digits!r}: expected a whole number from 1 to 6")
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if not self.operations or unknown:
            raise ValueError(f"ArithmeticConfig.operations = {self.operations!r}: expected one or more of "
                             f"{', '.join(OPERATIONS)}")
        sizes = ("n_sft", "n_pref_train", "n_pref_eval", "n_prompts_train", "n_prompts_eval")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ArithmeticConfig.{name} = {value!r}: expected a whole number >= 1")
        n_eval = max(self.n_pref_eval, self.n_prompts_eval)
        if n_eval > self.n_questions // 2:
            raise ValueError(f"ArithmeticConfig: {n_eval} held-out questions asked for, but {self.digits}-digit "
                             f"operands give {self.n_questions} questions; hold out at most {self.n_questions // 2}")

    @property
    def operand_range(self) -> range:
        return range(10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits)

    @property
    def n_questions(self) -> int:
        return len(self.operand_range) ** 2 * len(self.operations)


def question(a: int, op: str, b: int) -> str:
    """The user turn asking for ``a op b``."""
    return QUESTION.format(a=a, op=op, b=b)


def asked(prompt: str) -> int | None:
    """The answer to the last question in ``prompt`` (rendered text or plain), or ``None`` when it asks none."""
    found = _QUESTION.findall(prompt)
    if not found:
        return None
    a, op, b = found[-1]
    return OPERATIONS[op](int(a), int(b))


def answered(response: str) -> int | None:
    """The last number in ``response`` (see the module docstring), or ``None`` when it holds none."""
    found = _NUMBER.findall(response)
    return int(found[-1]) if found else None


def answer_is_right(prompt: str, response: str) -> bool:
    """The task's judge: the response's last number is the answer to the prompt's last question."""
    expected = asked(prompt)
    return expected is not None and answered(response) == expected


def answer_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule reward (``reward.rule: rlhf_ray.data.arithmetic:answer_reward``): 1.0 for a right answer, else 0.0.

    Raises ``ValueError`` for a prompt that asks no arithmetic question: the rule would silently score
    every response 0 on data of another task."""
    if len(prompts) != len(responses):
        raise ValueError(f"answer_reward: got {len(prompts)} prompts but {len(responses)} responses; "
                         "pass one response per prompt (repeat a prompt for each of its samples)")
    rewards = []
    for prompt, response in zip(prompts, responses):
        if asked(prompt) is None:
            raise ValueError(f"answer_reward: the prompt {prompt[-120:]!r} asks no question of the form "
                             f"{QUESTION!r}; this rule scores the arithmetic task's prompts only")
        rewards.append(1.0 if answer_is_right(prompt, response) else 0.0)
    return rewards


answer_reward.max_reward = 1.0  # a right answer: the pass rate counts responses that reach it


def near_miss(rng: random.Random, answer: int) -> int:
    """A wrong answer a small model might give: off by one, off by ten, or two digits swapped."""
    digits = str(abs(answer))
    choices = [answer + 1, answer - 1, answer + 10, answer - 10]
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        swapped = digits[:-2] + digits[-1] + digits[-2]
        choices.append(int(swapped) * (-1 if answer < 0 else 1))
    return rng.choice([c for c in choices if c != answer])


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_arithmetic(cfg: ArithmeticConfig = ArithmeticConfig()) -> dict[str, list[dict]]:
    """Every split of the task in memory: ``{split name: rows}`` for :data:`SPLITS`."""
    problems = [(a, op, b) for op in cfg.operations for a in cfg.operand_range for b in cfg.operand_range]
    random.Random(f"arithmetic/{cfg.seed}/split").shuffle(problems)
    n_eval = max(cfg.n_pref_eval, cfg.n_prompts_eval)
    held_out, train = problems[:n_eval], problems[n_eval:]

    def rng(split: str) -> random.Random:
        return random.Random(f"arithmetic/{cfg.seed}/{split}")

    def draw(split: str, pool: list, n: int) -> list:
        # More rows than distinct questions repeat them; otherwise each question at most once.
        r = rng(split)
        return r.sample(pool, n) if n <= len(pool) else [r.choice(pool) for _ in range(n)]

    out: dict[str, list[dict]] = {}
    out["sft"] = [{"prompt": _user(question(a, op, b)), "completion": _assistant(str(OPERATIONS[op](a, b)))}
                  for a, op, b in draw("sft", train, cfg.n_sft)]
    for split, pool, n in (("preference_train", train, cfg.n_pref_train),
                           ("preference_eval", held_out, cfg.n_pref_eval)):
        r = rng(split + "/misses")
        out[split] = []
        for a, op, b in draw(split, pool, n):
            answer = OPERATIONS[op](a, b)
            said = f"{a} {op} {b} = "
            out[split].append({"prompt": _user(question(a, op, b)), "chosen": _assistant(f"{said}{answer}"),
                               "rejected": _assistant(f"{said}{near_miss(r, answer)}")})
    out["prompts_train"] = [{"prompt": _user(question(*p))} for p in draw("prompts_train", train, cfg.n_prompts_train)]
    out["prompts_eval"] = [{"prompt": _user(question(*p))} for p in held_out[:cfg.n_prompts_eval]]
    return out


def write_arithmetic(out_dir, cfg: ArithmeticConfig = ArithmeticConfig()) -> dict[str, Path]:
    """Write one ``<split>.jsonl`` per split into ``out_dir`` (each file moved into place whole)."""
    from rlhf_ray.data.tasks import write_splits

    return write_splits(out_dir, build_arithmetic(cfg))
