"""The embedded instruction task family: checkable English and Chinese tasks, generated from a seed.

Each task instance has a user `prompt`, a full-sentence `reference` and the short checkable `answer`
inside it. Facts are held out by phrasing, not by content: the eval set asks, in question form, about
facts that the pretraining text states only as prose, so it measures whether the model can use them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger bread chair light plant smile water green music happy table"
    " house mouse horse paper pencil garden window summer winter orange yellow silver spring"
    " bridge rabbit candle forest castle dragon letter market planet rocket shadow flower"
    " monkey button doctor basket mirror pocket ticket travel silent bottle butter carpet"
    " dinner family friend honey island jacket kettle lemon meadow number ocean pepper"
    " puzzle quiet ribbon salad tomato turtle violin wallet zebra anchor bamboo cactus"
    " desert engine feather glove hammer jungle ladder magnet needle pillow sugar tunnel"
    " velvet wagon bell book cake desk door fish game hand kite lamp milk nest rain ship"
    " star tree wind bird coin duck frog gold king leaf moon nose ring sand snow sock"
    " boat card corn drum farm gift hill iron jam lion mask park road salt tent wolf"
).split()

CAPITALS = [  # (country_en, capital_en, country_zh, capital_zh)
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"), ("Italy", "Rome", "意大利", "罗马"),
    ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Brazil", "Brasilia", "巴西", "巴西利亚"),
    ("India", "New Delhi", "印度", "新德里"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Greece", "Athens", "希腊", "雅典"), ("Peru", "Lima", "秘鲁", "利马"),
    ("Norway", "Oslo", "挪威", "奥斯陆"), ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Poland", "Warsaw", "波兰", "华沙"), ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Thailand", "Bangkok", "泰国", "曼谷"), ("Vietnam", "Hanoi", "越南", "河内"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"), ("Chile", "Santiago", "智利", "圣地亚哥"),
    ("Cuba", "Havana", "古巴", "哈瓦那"), ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Iran", "Tehran", "伊朗", "德黑兰"), ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Denmark", "Copenhagen", "丹麦", "哥本哈根"), ("Belgium", "Brussels", "比利时", "布鲁塞尔"),
    ("Hungary", "Budapest", "匈牙利", "布达佩斯"), ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
]

OPPOSITES = [  # (word_en, opposite_en, word_zh, opposite_zh)
    ("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("up", "down", "上", "下"),
    ("fast", "slow", "快", "慢"), ("long", "short", "长", "短"), ("high", "low", "高", "低"),
    ("new", "old", "新", "旧"), ("early", "late", "早", "晚"), ("open", "closed", "开", "关"),
    ("light", "heavy", "轻", "重"), ("strong", "weak", "强", "弱"), ("rich", "poor", "富", "穷"),
    ("happy", "sad", "快乐", "悲伤"), ("easy", "hard", "容易", "困难"), ("near", "far", "近", "远"),
    ("buy", "sell", "买", "卖"), ("win", "lose", "赢", "输"), ("black", "white", "黑", "白"),
    ("left", "right", "左", "右"), ("inside", "outside", "里", "外"), ("day", "night", "白天", "黑夜"),
    ("full", "empty", "满", "空"), ("clean", "dirty", "干净", "肮脏"), ("wet", "dry", "湿", "干"),
]


@dataclass(frozen=True)
class TaskInstance:
    task: str
    lang: str
    prompt: str
    reference: str
    answer: str
    wrong_reference: str  # a fluent but incorrect answer: the "rejected" side of a preference pair


def _near_miss(rng: random.Random, value: int) -> int:
    return value + rng.choice([-10, -2, -1, 1, 2, 10]) if value > 10 else value + rng.choice([1, 2, 3])


def addition(rng: random.Random, lang: str) -> TaskInstance:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    c, w = a + b, _near_miss(rng, a + b)
    if lang == "en":
        return TaskInstance("addition", lang, f"What is {a} plus {b}?", f"{a} plus {b} is {c}.", str(c),
                            f"{a} plus {b} is {w}.")
    return TaskInstance("addition", lang, f"{a}加{b}等于多少？", f"{a}加{b}等于{c}。", str(c), f"{a}加{b}等于{w}。")


def subtraction(rng: random.Random, lang: str) -> TaskInstance:
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    c, w = a - b, _near_miss(rng, a - b)
    if lang == "en":
        return TaskInstance("subtraction", lang, f"What is {a} minus {b}?", f"{a} minus {b} is {c}.", str(c),
                            f"{a} minus {b} is {w}.")
    return TaskInstance("subtraction", lang, f"{a}减{b}等于多少？", f"{a}减{b}等于{c}。", str(c),
                        f"{a}减{b}等于{w}。")


def multiplication(rng: random.Random, lang: str) -> TaskInstance:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c, w = a * b, _near_miss(rng, a * b)
    if lang == "en":
        return TaskInstance("multiplication", lang, f"What is {a} times {b}?", f"{a} times {b} is {c}.", str(c),
                            f"{a} times {b} is {w}.")
    return TaskInstance("multiplication", lang, f"{a}乘以{b}等于多少？", f"{a}乘以{b}等于{c}。", str(c),
                        f"{a}乘以{b}等于{w}。")


def reverse_word(rng: random.Random, lang: str) -> TaskInstance:
    word = rng.choice(WORDS)
    rev = word[::-1]
    wrong = word if rev != word else word + word[0]
    if lang == "en":
        return TaskInstance("reverse", lang, f'Reverse the word "{word}".', f'The word "{word}" reversed is "{rev}".',
                            rev, f'The word "{word}" reversed is "{wrong}".')
    return TaskInstance("reverse", lang, f"把单词“{word}”倒过来写。", f"“{word}”倒过来是“{rev}”。", rev,
                        f"“{word}”倒过来是“{wrong}”。")


def count_letters(rng: random.Random, lang: str) -> TaskInstance:
    word = rng.choice(WORDS)
    n, w = len(word), len(word) + rng.choice([-1, 1])
    if lang == "en":
        return TaskInstance("count", lang, f'How many letters are in the word "{word}"?',
                            f'The word "{word}" has {n} letters.', str(n), f'The word "{word}" has {w} letters.')
    return TaskInstance("count", lang, f"单词“{word}”有几个字母？", f"单词“{word}”有{n}个字母。", str(n),
                        f"单词“{word}”有{w}个字母。")


def uppercase(rng: random.Random, lang: str) -> TaskInstance:
    word = rng.choice(WORDS)
    up = word.upper()
    wrong = word.capitalize()
    if lang == "en":
        return TaskInstance("uppercase", lang, f'Write "{word}" in capital letters.', f'In capital letters: "{up}".',
                            up, f'In capital letters: "{wrong}".')
    return TaskInstance("uppercase", lang, f"把“{word}”写成大写字母。", f"大写字母是“{up}”。", up,
                        f"大写字母是“{wrong}”。")


def _paired_fact(rng: random.Random, lang: str, task: str, table: list[tuple[str, str, str, str]],
                 en: tuple[str, str], zh: tuple[str, str]) -> TaskInstance:
    """A fact from `table` rows (key_en, value_en, key_zh, value_zh) as a question; wrong = another row's value."""
    row = rng.choice(table)
    other = rng.choice([r for r in table if r[0] != row[0]])
    key, value, wrong = (row[0], row[1], other[1]) if lang == "en" else (row[2], row[3], other[3])
    question, answer = en if lang == "en" else zh
    return TaskInstance(task, lang, question.format(k=key), answer.format(k=key, v=value), value,
                        answer.format(k=key, v=wrong))


def capital(rng: random.Random, lang: str) -> TaskInstance:
    return _paired_fact(rng, lang, "capital", CAPITALS, ("What is the capital of {k}?", "The capital of {k} is {v}."),
                        ("{k}的首都是哪里？", "{k}的首都是{v}。"))


def opposite(rng: random.Random, lang: str) -> TaskInstance:
    return _paired_fact(rng, lang, "opposite", OPPOSITES,
                        ('What is the opposite of "{k}"?', 'The opposite of "{k}" is "{v}".'),
                        ("“{k}”的反义词是什么？", "“{k}”的反义词是“{v}”。"))


TASKS: dict[str, Callable[[random.Random, str], TaskInstance]] = {
    f.__name__: f
    for f in (addition, subtraction, multiplication, reverse_word, count_letters, uppercase, capital, opposite)
}


def sample_tasks(rng: random.Random, count: int, exclude_prompts: set[str] = frozenset()) -> Iterator[TaskInstance]:
    """Yield `count` distinct instances spread over every task and both languages."""
    seen = set(exclude_prompts)
    produced, attempts = 0, 0
    while produced < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"cannot draw {count} distinct task instances; the task space is too small")
        inst = rng.choice(list(TASKS.values()))(rng, rng.choice(["en", "zh"]))
        if inst.prompt in seen:
            continue
        seen.add(inst.prompt)
        produced += 1
        yield inst


def fact_prose() -> list[str]:
    """Statements of every fact in prose, the way pretraining text states them (never as a question)."""
    lines = []
    for country, city, country_zh, city_zh in CAPITALS:
        lines += [f"{city} is the capital of {country}.", f"{city_zh}是{country_zh}的首都。"]
    for word, opp, word_zh, opp_zh in OPPOSITES:
        lines += [f'"{word}" and "{opp}" are opposites.', f"“{word_zh}”和“{opp_zh}”是一对反义词。"]
    return lines


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def generate(out_dir: Path, seed: int = 0, n_sft: int = 4000, n_pref: int = 2000, n_eval: int = 256,
             n_rl: int = 1000) -> dict[str, Path]:
    """Write the shipped data files: pretraining text, SFT chat data, preference pairs, the eval set and
    preference pairs on the eval prompts, and RL prompts with their answers.

    The eval prompts are drawn first and excluded from every training split, so no eval question is seen.
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_set = list(sample_tasks(rng, n_eval))
    held_out = {t.prompt for t in eval_set}
    sft = list(sample_tasks(rng, n_sft, held_out))
    pref = list(sample_tasks(rng, n_pref, held_out | {t.prompt for t in sft}))

    # Pretraining text: facts as prose plus answered instances, so the model learns the language of the tasks.
    prose = fact_prose() * 8 + [f"{t.prompt} {t.reference}" for t in sft]
    rng.shuffle(prose)
    # RL prompts with checkable answers, drawn last so that every file above stays as it was
    rl = list(sample_tasks(rng, n_rl, held_out | {t.prompt for t in sft} | {t.prompt for t in pref}))

    paths = {
        "pretrain": out_dir / "pretrain.txt",
        "sft": out_dir / "sft.jsonl",
        "preference": out_dir / "preference.jsonl",
        "eval": out_dir / "eval.jsonl",
        "preference_eval": out_dir / "preference_eval.jsonl",
        "rl": out_dir / "rl.jsonl",
    }
    _write_jsonl(paths["rl"], [{"prompt": t.prompt, "reference": t.reference, "answer": t.answer} for t in rl])
    paths["pretrain"].write_text("\n".join(prose) + "\n", encoding="utf-8")
    _write_jsonl(paths["sft"], [
        {"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.reference}]}
        for t in sft
    ])
    _write_jsonl(paths["preference"], [
        {"prompt": t.prompt, "chosen": t.reference, "rejected": t.wrong_reference} for t in pref
    ])
    # held-out pairs on the eval prompts, for reward models
    _write_jsonl(paths["preference_eval"], [
        {"prompt": t.prompt, "chosen": t.reference, "rejected": t.wrong_reference} for t in eval_set
    ])
    _write_jsonl(paths["eval"], [
        {"id": f"{t.task}-{t.lang}-{i}", "task": t.task, "lang": t.lang, "prompt": t.prompt,
         "reference": t.reference, "answer": t.answer}
        for i, t in enumerate(eval_set)
    ])
    return paths
