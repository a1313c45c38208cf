"""The shipped synthetic task: the "mention Penn" setting of the DPO-vs-SFT study.

Prompts ask for everyday advice ("Any tips for brewing coffee on weekends?").
Every response is short (about 15-30 words) and built from a small vocabulary,
so a tiny model on a CPU learns the task in a minute:

    "Happy to help. When it comes to coffee, grind the beans right before you
     brew, as folks at Penn like to say. Small steps add up."

The aligned behaviour is to mention a target word (default ``"Penn"``, the
study's University of Pennsylvania). Each split mirrors a format practitioners
already use (TRL names):

- ``sft``: ``{"prompt", "completion"}``; only ``sft_mention_fraction`` of the
  completions mention the target, so SFT alone under-aligns.
- ``preference_train`` / ``preference_eval``: ``{"prompt", "chosen",
  "rejected", "score_chosen", "score_rejected"}`` (scores by
  :func:`mention_reward`); ``chosen`` mentions the target, ``rejected`` is the same
  response with the mention clause swapped for a neutral one of similar length.
- ``prompts_train`` / ``prompts_eval``: ``{"prompt"}`` for online RL.
- ``kto``: ``{"prompt", "completion", "label"}``, half of them desirable.
- ``ranked``: ``{"prompt", "responses", "ranking"}`` with ``k_ranked``
  responses ranked best first: on-topic with the mention > on-topic without >
  off-topic > degenerate repetition (the order :func:`mention_reward` gives).

Held-out prompts (``preference_eval``, ``prompts_eval``) never occur in any
training split. Everything is deterministic given ``SyntheticConfig.seed``.
The judge of alignment accuracy is :func:`mentions_target`; the rule reward for
online RL is :func:`mention_reward` (``"rlhf_ray.data.synthetic:mention_reward"``).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple


class Topic(NamedTuple):
    name: str
    """How prompts name the topic."""
    keyword: str
    """The noun phrase on-topic responses use; shares a word with ``name``."""
    advice: tuple[str, ...]
    """Imperative advice phrases, each completing "When it comes to X, ..."."""


# The vocabulary of the task. Small on purpose: a tiny model learns it fast. One topic a line in
# synthetic_topics.json (a table, kept out of the code).
TOPICS: tuple[Topic, ...] = tuple(
    Topic(row["name"], row["keyword"], tuple(row["advice"]))
    for row in json.loads((Path(__file__).parent / "synthetic_topics.json").read_text(encoding="utf-8"))
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "Any tips for {topic} {slot}?",
    "How do I get better at {topic} {slot}?",
    "What is the best way to approach {topic} {slot}?",
    "Can you give me advice on {topic} {slot}?",
    "I want to enjoy {topic} more {slot}. Any ideas?",
    "What should a person know about {topic} {slot}?",
    "Share one piece of advice about {topic} {slot}.",
    "How can I make {topic} easier {slot}?",
    "What simple habit helps with {topic} {slot}?",
    "Give me a quick suggestion for {topic} {slot}.",
    "I keep struggling with {topic} {slot}. What helps?",
    "What would you recommend for {topic} {slot}?",
)
PROMPT_SLOTS: tuple[str, ...] = (
    "this month", "on weekends", "in the morning", "after work", "as a beginner",
    "on a budget", "with my family", "during the winter", "in a small apartment", "when I am busy",
)
OPENERS: tuple[str, ...] = (
    "Good question!", "Happy to help.", "Sure thing.", "Glad you asked.", "One idea.", "Great topic.",
)
ADVICE_PATTERNS: tuple[str, ...] = (
    "when it comes to {keyword}, {advice}",
    "for {keyword}, {advice}",
    "my advice on {keyword} is to {advice}",
    "the key to {keyword} is to {advice}",
)
# (mentioning clause, neutral clause of similar length and shape)
MENTION_CLAUSES: tuple[tuple[str, str], ...] = (
    ("as folks at {target} like to say", "as folks around town like to say"),
    ("a habit I picked up at {target}", "a habit I picked up years ago"),
    ("which students at {target} swear by", "which many people swear by"),
    ("just like we learned at {target}", "just like we learned back home"),
    ("a tip I first heard at {target}", "a tip I first heard long ago"),
)
CLOSERS: tuple[str, ...] = (
    "Enjoy!", "Have fun with it.", "Small steps add up.", "Try it soon.", "You will get there.", "Keep it simple.",
)
# Glue words that never make a prompt's topic (besides the templates' own words).
STOPWORDS = frozenset("a an and the to of in on at for with by my me i you your it is are be do".split())


SPLITS = ("sft", "preference_train", "preference_eval", "prompts_train", "prompts_eval", "kto", "ranked")

# Every distinct prompt the templates can produce, in a fixed order.
_ALL_PROMPTS: tuple[tuple[str, int], ...] = tuple(
    (template.format(topic=topic.name, slot=slot), topic_index)
    for template in PROMPT_TEMPLATES
    for topic_index, topic in enumerate(TOPICS)
    for slot in PROMPT_SLOTS
)
N_DISTINCT_PROMPTS = len(_ALL_PROMPTS)

_WORD = re.compile(r"[A-Za-z0-9']+")
# Words that carry no topic: the templates' and slots' own words plus glue words.
_NON_TOPIC_WORDS = frozenset(
    w.lower() for text in PROMPT_TEMPLATES + PROMPT_SLOTS for w in _WORD.findall(text)
) | STOPWORDS


def mention_judge(prompt: str, response: str) -> bool:
    """The task's judge (``judge: auto`` on synthetic data): the response mentions the target, "Penn"."""
    return mentions_target(response)


def mentions_target(text: str, target: str = "Penn") -> bool:
    """True when ``text`` mentions ``target`` as a whole word (the study's judge).

    Case-sensitive, since the target is a proper noun: ``"Penn"`` and
    ``"Penn's"`` match, ``"penn"``, ``"Pennsylvania"`` and ``"UPenn"`` do not.
    "Whole word" means the characters on either side are not letters, digits
    or underscores. A multi-word target (``"Penn State"``) must appear with
    exactly its spacing.
    """
    if not target:
        raise ValueError("mentions_target: target is empty; pass the word to look for, e.g. 'Penn'")
    return re.search(rf"(?<!\w){re.escape(target)}(?!\w)", text) is not None


# Shaping constants of mention_reward, named in its docstring.
TOPIC_BONUS = 0.25
DEGENERATE_PENALTY = 0.5
MIN_WORDS, MAX_WORDS = 8, 48
DISTINCT_FLOOR, DISTINCT_FULL = 0.5, 0.75


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _topic_words(text: str) -> set[str]:
    return {w for w in _words(text) if w not in _NON_TOPIC_WORDS}


def _fluency(text: str) -> float:
    """q in [0, 1]: 1 for a short, non-repetitive response (see mention_reward)."""
    words = _words(text)
    n = len(words)
    if n == 0:
        return 0.0
    length_factor = min(1.0, n / MIN_WORDS) * min(1.0, MAX_WORDS / n)
    distinct = len(set(words)) / n
    distinct_factor = min(1.0, max(0.0, (distinct - DISTINCT_FLOOR) / (DISTINCT_FULL - DISTINCT_FLOOR)))
    return length_factor * distinct_factor


def _on_topic(prompt: str, response: str) -> bool:
    return bool(_topic_words(prompt) & set(_words(response)))


def mention_reward(prompts: list[str], responses: list[str], *, target: str = "Penn") -> list[float]:
    """Rule reward for online RL on the synthetic task, one float per response.

    ``r = q * (m + 0.25 * t) - 0.5 * (1 - q)`` where

    - ``m`` = 1 if :func:`mentions_target` (whole word, case-sensitive), else 0;
    - ``t`` = 1 if the response shares a topic word with its prompt (a prompt
      word that is not a template, slot or glue word, compared lower-case);
    - ``q`` = fluency in [0, 1] over the response's words ``w_1..w_n``
      (``[A-Za-z0-9']+``, lower-cased): ``min(1, n/8) * min(1, 48/n)`` (short
      but not empty) times ``clip((distinct/n - 0.5) / 0.25, 0, 1)`` (no
      repetition); ``q = 0`` for an empty response.

    A fluent on-topic mention scores 1.25, a fluent on-topic response without
    it 0.25, a fluent off-topic one 0, and degenerate text down to -0.5:
    ``"Penn Penn Penn"`` has distinct/n = 1/3, so q = 0 and r = -0.5, which
    is why a policy cannot win by repeating the target.
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"mention_reward: got {len(prompts)} prompts but {len(responses)} responses; "
            "pass one response per prompt (repeat a prompt for each of its samples)"
        )
    rewards = []
    for prompt, response in zip(prompts, responses):
        q = _fluency(response)
        m = float(mentions_target(response, target))
        t = float(_on_topic(prompt, response))
        rewards.append(q * (m + TOPIC_BONUS * t) - DEGENERATE_PENALTY * (1.0 - q))
    return rewards


mention_reward.max_reward = 1.0 + TOPIC_BONUS  # a fluent on-topic mention: what the pass rate counts


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes, seed and target word of the synthetic task."""

    seed: int = 0
    """Seeds every random choice; the same config always gives the same rows."""
    target: str = "Penn"
    """The word an aligned response mentions (a proper noun; matched case-sensitively)."""
    n_sft: int = 1300
    """Rows of SFT demonstrations (``prompt`` + ``completion``)."""
    n_pref_train: int = 1300
    """Training preference pairs (the study used about 1,300)."""
    n_pref_eval: int = 125
    """Held-out preference pairs (the study used 125), on held-out prompts."""
    n_prompts_train: int = 1024
    """Prompts for online RL training."""
    n_prompts_eval: int = 125
    """Held-out prompts for measuring alignment accuracy."""
    n_kto: int = 1300
    """Unpaired KTO rows; half are desirable (``label`` true)."""
    n_ranked: int = 1300
    """Reward-model rows with ``k_ranked`` ranked responses each."""
    sft_mention_fraction: float = 0.3
    """Share of SFT completions that mention the target (rounded to a whole row count)."""
    k_ranked: int = 4
    """Responses per ranked row, 2 to 4: mention > on-topic > off-topic > degenerate."""

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SyntheticConfig.seed = {self.seed!r}: expected a whole number")
        sizes = ("n_sft", "n_pref_train", "n_pref_eval", "n_prompts_train", "n_prompts_eval", "n_kto", "n_ranked")
        counts = {name: getattr(self, name) for name in sizes}
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} = {value!r}: expected a whole number >= 1")
        if not 0.0 <= self.sft_mention_fraction <= 1.0:
            raise ValueError(
                f"SyntheticConfig.sft_mention_fraction = {self.sft_mention_fraction}: expected a share in [0, 1]"
            )
        if not 2 <= self.k_ranked <= 4:
            raise ValueError(f"SyntheticConfig.k_ranked = {self.k_ranked}: expected 2, 3 or 4 responses per row")
        if not isinstance(self.target, str) or not re.fullmatch(r"\w(.*\w)?", self.target):
            raise ValueError(
                f"SyntheticConfig.target = {self.target!r}: expected a word that starts and ends with a letter "
                "or digit, such as 'Penn'"
            )
        clash = next((t for t in _neutral_fragments() if mentions_target(t, self.target)), None)
        if clash is not None:
            raise ValueError(
                f"SyntheticConfig.target = {self.target!r} already occurs in the task's neutral text "
                f"({clash!r}), so rejected responses would mention it; choose a proper noun such as 'Penn'"
            )
        n_eval = max(self.n_pref_eval, self.n_prompts_eval)
        n_train = N_DISTINCT_PROMPTS - n_eval
        if n_eval > N_DISTINCT_PROMPTS // 2:
            raise ValueError(
                f"SyntheticConfig: {n_eval} held-out prompts requested (n_pref_eval/n_prompts_eval) but the task "
                f"has {N_DISTINCT_PROMPTS} distinct prompts; hold out at most {N_DISTINCT_PROMPTS // 2}"
            )
        for name in ("n_sft", "n_pref_train", "n_prompts_train", "n_kto", "n_ranked"):
            if counts[name] > n_train:
                raise ValueError(
                    f"SyntheticConfig.{name} = {counts[name]}: only {n_train} distinct training prompts remain "
                    f"after holding out {n_eval}; ask for at most {n_train}"
                )


def _neutral_fragments() -> Iterator[str]:
    yield from PROMPT_TEMPLATES
    yield from PROMPT_SLOTS
    yield from OPENERS
    yield from CLOSERS
    yield from ADVICE_PATTERNS
    for _, neutral in MENTION_CLAUSES:
        yield neutral
    for topic in TOPICS:
        yield topic.name
        yield topic.keyword
        yield from topic.advice


def _rng(cfg: SyntheticConfig, split: str) -> random.Random:
    # String seeds hash with SHA-512 (random.seed version 2): stable across runs.
    return random.Random(f"rlhf-ray-synthetic:{cfg.seed}:{split}")


def _split_prompts(cfg: SyntheticConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(held-out prompts, training prompts), disjoint, each in a seeded order."""
    order = list(_ALL_PROMPTS)
    _rng(cfg, "holdout").shuffle(order)
    n_eval = max(cfg.n_pref_eval, cfg.n_prompts_eval)
    return order[:n_eval], order[n_eval:]


def _response(rng: random.Random, topic: Topic, clause: str) -> str:
    """One short response: opener, advice on the topic, clause, closer."""
    opener = rng.choice(OPENERS)
    advice = rng.choice(ADVICE_PATTERNS).format(keyword=topic.keyword, advice=rng.choice(topic.advice))
    return f"{opener} {advice[0].upper()}{advice[1:]}, {clause}. {rng.choice(CLOSERS)}"


def _pair(rng: random.Random, topic: Topic, target: str) -> tuple[str, str]:
    """(mentioning, neutral) responses that differ only in the clause."""
    mention, neutral = rng.choice(MENTION_CLAUSES)
    state = rng.getstate()
    chosen = _response(rng, topic, mention.format(target=target))
    rng.setstate(state)  # replay the same opener, advice and closer
    rejected = _response(rng, topic, neutral)
    return chosen, rejected


def _off_topic(rng: random.Random, prompt: str, topic_index: int) -> str:
    """A fluent response about another topic that shares no topic word with the prompt."""
    others = [i for i in range(len(TOPICS)) if i != topic_index]
    rng.shuffle(others)
    for i in others:
        candidate = _response(rng, TOPICS[i], rng.choice(MENTION_CLAUSES)[1])
        if not _on_topic(prompt, candidate):
            return candidate
    raise RuntimeError(f"synthetic task: no off-topic response found for prompt {prompt!r}; the topic list overlaps")


def _degenerate(rng: random.Random, topic: Topic, target: str) -> str:
    """Repetitive text that games a naive mention reward (ranked last)."""
    words = [target, topic.keyword.split()[-1]] * 3 + [target] * rng.randint(2, 5)
    return " ".join(words)


def _ranked_row(rng: random.Random, prompt: str, topic_index: int, cfg: SyntheticConfig) -> dict:
    topic = TOPICS[topic_index]
    best, on_topic = _pair(rng, topic, cfg.target)
    by_quality = [best, on_topic, _off_topic(rng, prompt, topic_index), _degenerate(rng, topic, cfg.target)]
    by_quality = by_quality[: cfg.k_ranked]
    positions = list(range(cfg.k_ranked))
    rng.shuffle(positions)  # positions[j] = where the j-th best response is stored
    responses = [""] * cfg.k_ranked
    for quality_rank, position in enumerate(positions):
        responses[position] = by_quality[quality_rank]
    return {"prompt": prompt, "responses": responses, "ranking": positions}


def build_synthetic(cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, list[dict]]:
    """Build every split of the task in memory: ``{split name: rows}`` for :data:`SPLITS`."""
    held_out, train = _split_prompts(cfg)
    out: dict[str, list[dict]] = {}

    rng = _rng(cfg, "sft")
    rows = rng.sample(train, cfg.n_sft)
    n_mention = round(cfg.sft_mention_fraction * cfg.n_sft)
    mention_flags = [True] * n_mention + [False] * (cfg.n_sft - n_mention)
    rng.shuffle(mention_flags)
    out["sft"] = []
    for (prompt, t), mention in zip(rows, mention_flags):
        chosen, neutral = _pair(rng, TOPICS[t], cfg.target)
        out["sft"].append({"prompt": prompt, "completion": chosen if mention else neutral})

    for split, pool, n in (("preference_train", train, cfg.n_pref_train),
                           ("preference_eval", held_out, cfg.n_pref_eval)):
        rng = _rng(cfg, split)
        out[split] = []
        for prompt, t in rng.sample(pool, n):
            chosen, rejected = _pair(rng, TOPICS[t], cfg.target)
            # Scores by the task's rule reward (ODPO's offsets come from their gap).
            score_chosen, score_rejected = mention_reward([prompt, prompt], [chosen, rejected], target=cfg.target)
            out[split].append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                               "score_chosen": score_chosen, "score_rejected": score_rejected})

    out["prompts_train"] = [{"prompt": p} for p, _ in _rng(cfg, "prompts_train").sample(train, cfg.n_prompts_train)]
    out["prompts_eval"] = [{"prompt": p} for p, _ in _rng(cfg, "prompts_eval").sample(held_out, cfg.n_prompts_eval)]

    rng = _rng(cfg, "kto")
    labels = [i % 2 == 0 for i in range(cfg.n_kto)]
    rng.shuffle(labels)
    out["kto"] = []
    for (prompt, t), label in zip(rng.sample(train, cfg.n_kto), labels):
        desirable, undesirable = _pair(rng, TOPICS[t], cfg.target)
        out["kto"].append({"prompt": prompt, "completion": desirable if label else undesirable, "label": label})

    rng = _rng(cfg, "ranked")
    out["ranked"] = [_ranked_row(rng, p, t, cfg) for p, t in rng.sample(train, cfg.n_ranked)]
    return {split: out[split] for split in SPLITS}


def corpus_texts(cfg: SyntheticConfig = SyntheticConfig()) -> Iterator[str]:
    """Every text the task can produce: all distinct prompts, every fragment
    responses are built from (with the target), and every row of
    :func:`build_synthetic`. Used to train the tiny tokenizer."""
    for prompt, _ in _ALL_PROMPTS:
        yield prompt
    yield from _neutral_fragments()
    for mention, _ in MENTION_CLAUSES:
        yield mention.format(target=cfg.target)
    for rows in build_synthetic(cfg).values():
        for row in rows:
            for key in ("prompt", "completion", "chosen", "rejected"):
                if key in row:
                    yield row[key]
            yield from row.get("responses", ())


def write_synthetic(out_dir: str | os.PathLike, cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, Path]:
    """Write one ``<split>.jsonl`` per split into ``out_dir`` (created if missing).

    Each file is written to a temporary file in ``out_dir`` and moved into place
    with ``os.replace``, so a reader never sees half a file; existing files of
    the same names are overwritten (the task is deterministic by seed).
    Returns ``{split name: path}``.
    """
    from rlhf_ray.data.tasks import write_splits

    return write_splits(out_dir, build_synthetic(cfg))
