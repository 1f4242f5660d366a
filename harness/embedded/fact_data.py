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

from harness.embedded.code_data import code_prose

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


def addition(rng: random.Random, lang: str) -> TaskInstance:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if lang == "en":
        return TaskInstance("addition", lang, f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b))
    return TaskInstance("addition", lang, f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。", str(a + b))


def subtraction(rng: random.Random, lang: str) -> TaskInstance:
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    if lang == "en":
        return TaskInstance("subtraction", lang, f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", str(a - b))
    return TaskInstance("subtraction", lang, f"{a}减{b}等于多少？", f"{a}减{b}等于{a - b}。", str(a - b))


def multiplication(rng: random.Random, lang: str) -> TaskInstance:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if lang == "en":
        return TaskInstance("multiplication", lang, f"What is {a} times {b}?", f"{a} times {b} is {a * b}.",
                            str(a * b))
    return TaskInstance("multiplication", lang, f"{a}乘以{b}等于多少？", f"{a}乘以{b}等于{a * b}。", str(a * b))


def reverse_word(rng: random.Random, lang: str) -> TaskInstance:
    word = rng.choice(WORDS)
    rev = word[::-1]
    if lang == "en":
        return TaskInstance("reverse", lang, f'Reverse the word "{word}".', f'The word "{word}" reversed is "{rev}".',
                            rev)
    return TaskInstance("reverse", lang, f"把单词“{word}”倒过来写。", f"“{word}”倒过来是“{rev}”。", rev)


def count_letters(rng: random.Random, lang: str) -> TaskInstance:
    word = rng.choice(WORDS)
    n = len(word)
    if lang == "en":
        return TaskInstance("count", lang, f'How many letters are in the word "{word}"?',
                            f'The word "{word}" has {n} letters.', str(n))
    return TaskInstance("count", lang, f"单词“{word}”有几个字母？", f"单词“{word}”有{n}个字母。", str(n))


def uppercase(rng: random.Random, lang: str) -> TaskInstance:
    word = rng.choice(WORDS)
    up = word.upper()
    if lang == "en":
        return TaskInstance("uppercase", lang, f'Write "{word}" in capital letters.', f'In capital letters: "{up}".',
                            up)
    return TaskInstance("uppercase", lang, f"把“{word}”写成大写字母。", f"大写字母是“{up}”。", up)


def _paired_fact(rng: random.Random, lang: str, task: str, table: list[tuple[str, str, str, str]],
                 en: tuple[str, str], zh: tuple[str, str]) -> TaskInstance:
    """A fact from `table` rows (key_en, value_en, key_zh, value_zh) as a question."""
    row = rng.choice(table)
    key, value = (row[0], row[1]) if lang == "en" else (row[2], row[3])
    question, answer = en if lang == "en" else zh
    return TaskInstance(task, lang, question.format(k=key), answer.format(k=key, v=value), value)


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


def sample_splits(rng: random.Random, sizes: dict[str, int],
                  exclude_prompts: set[str] = frozenset()) -> dict[str, list[TaskInstance]]:
    """Draw several splits at once, each instance going to the split least filled for its size, so that the tasks
    with few distinct instances (capitals, opposites, the word tasks) are shared out among all the splits instead
    of used up by the first one drawn (which left the preference and RL prompts nothing but arithmetic)."""
    splits: dict[str, list[TaskInstance]] = {name: [] for name in sizes}
    for inst in sample_tasks(rng, sum(sizes.values()), exclude_prompts):
        name = min((n for n in sizes if len(splits[n]) < sizes[n]), key=lambda n: len(splits[n]) / sizes[n])
        splits[name].append(inst)
    return splits


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


def generate(out_dir: Path, seed: int = 0, n_sft: int = 2000, n_pref: int = 1000, n_eval: int = 256,
             n_rl: int = 500, paragraph: int = 4) -> dict[str, Path]:
    """Write the shipped data files that need no model: pretraining text, SFT chat data, the prompts (with their
    right answers) of the preference pairs, the eval set, and RL prompts with their answers. The pairs themselves
    are the instruct model's own answers (harness.commands.self_pairs, `make data`).

    The eval prompts are drawn first and excluded from every training split, so no eval question is seen.
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_set = list(sample_tasks(rng, n_eval))
    held_out = {t.prompt for t in eval_set}
    splits = sample_splits(rng, {"sft": n_sft, "preference": n_pref, "rl": n_rl}, held_out)
    sft, pref, rl = splits["sft"], splits["preference"], splits["rl"]

    # Pretraining text: facts as prose plus answered instances, `paragraph` to a document, as questions and answers
    # run on in web text (the base model learns the language of the tasks, and to go on to the next question), and
    # the training code tasks' functions as one-line Python.
    answered = [f"{t.prompt} {t.reference}" for t in sft]
    prose = (fact_prose() * 8 + [" ".join(answered[i : i + paragraph]) for i in range(0, len(answered), paragraph)]
             + code_prose(seed))
    rng.shuffle(prose)

    paths = {
        "pretrain": out_dir / "pretrain.txt",
        "sft": out_dir / "sft.jsonl",
        "preference_prompts": out_dir / "preference_prompts.jsonl",
        "eval": out_dir / "eval.jsonl",
        "rl": out_dir / "rl.jsonl",
    }
    _write_jsonl(paths["rl"], [{"prompt": t.prompt, "reference": t.reference, "answer": t.answer} for t in rl])
    paths["pretrain"].write_text("\n".join(prose) + "\n", encoding="utf-8")
    _write_jsonl(paths["sft"], [
        {"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.reference}]}
        for t in sft
    ])
    _write_jsonl(paths["preference_prompts"], [
        {"prompt": t.prompt, "reference": t.reference, "answer": t.answer} for t in pref
    ])
    _write_jsonl(paths["eval"], [
        {"id": f"{t.task}-{t.lang}-{i}", "task": t.task, "lang": t.lang, "prompt": t.prompt,
         "reference": t.reference, "answer": t.answer}
        for i, t in enumerate(eval_set)
    ])
    return paths
