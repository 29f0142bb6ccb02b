"""Write megahf's tiny hand-made evaluation and fine-tuning fixtures under src/megahf/assets/fixtures/ (run from the
repo root).

They are NOT the real LAMBADA, WikiText-103, GLUE or RACE data (no package ships those): a few sentences written or
generated for megahf's tests, stored in the exact Hub schemas so that the code paths that read the real data are
exercised offline:

* `lambada_openai/`: laid out like the Hub dataset EleutherAI/lambada_openai (`text`, split `test`), plus
  `lambada_openai.jsonl`, the same passages in Megatron's input format (one {"text": ...} per line);
* `wikitext/`: laid out like Salesforce/wikitext, config wikitext-103-raw-v1 (`text`, one row per line, "" for a
  blank line, a heading like " = Title = \\n", each line keeping its "\\n"), split test, plus `wiki.test.raw`, the rows
  joined (the raw-file form Megatron reads);
* `glue/`: laid out like nyu-mll/glue, one folder per config (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli),
  the Hub's columns, ClassLabel labels (stsb: float32 scores), splits train (64 rows), validation (32; mnli
  validation_matched and validation_mismatched) and test (16, labels -1; mnli test_matched and test_mismatched);
* `race/`: laid out like ehovy/race, configs high and middle (train 32 rows, validation 16, test 8; two questions per
  article, example_id "high1000.txt"/"middle1100.txt" as in the real data) and all (the two joined).

The GLUE and RACE rows are generated from templates with a fixed seed, and made SEPARABLE by a lexical cue so that a
tiny BERT fine-tuned for a few dozen steps gets clearly above chance: each class has its own cue words (sst2
positive "wonderful"/"great"/"lovely", negative "terrible"/"awful"/"boring", ...: see `GLUE_TASKS`); in RACE the
right option is a word of the article and the three wrong options come from a fixed set of words no article uses.
Every word is one entry of the shipped bert-uncased vocabulary (checked when building).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path("src/megahf/assets/fixtures")

LAMBADA = [
    "The old lighthouse keeper climbed the stairs every night to light the lamp. When the storm came, the ships "
    "were saved by the keeper",
    "She planted tomatoes, beans and squash in her garden. By August the kitchen table was covered in tomatoes",
    "Marcus practiced the violin for hours each day. At the concert, everyone stood up to applaud Marcus",
    "The children built a snowman in the yard and gave it a carrot nose. By noon the sun had melted the snowman",
    "Professor Quillfeather lectured on ancient maps. The students agreed that nobody knew more about maps than "
    "Quillfeather",
    "The train to the coast left at dawn. Grandma packed sandwiches, and we ate them on the train",
    "He searched the whole house for his glasses. In the end they were resting on his own forehead, and he laughed "
    "at his glasses",
    "The recipe called for flour, sugar, eggs and butter. She had everything except the butter",
]

WIKITEXT_ROWS = [
    "",
    " = Exampleton Fixture = \n",
    "",
    " Exampleton is a fictional town written for megahf 's tests . It is 1 @,@ 250 km from the coast and has a "
    "population of 3 @.@ 5 thousand . \n",
    " The town 's river ( the Fixture River ) floods in spring ; the 19th @-@ century bridge survived . \n",
    "",
    " = = History = = \n",
    "",
    " Settlers arrived in N . The founders ' records say \" the winters were long \" , and the summers 23 \u00b0 C "
    "! \n",
    " = = = Economy = = = \n",
    " Farming , fishing and tourism : the three trades of the players ' league [ citation needed ] . \n",
    "",
]

LAMBADA_README = """---
configs:
- config_name: default
  data_files:
  - split: test
    path: default/test-00000-of-00001.parquet
---
# megahf test fixture, laid out like EleutherAI/lambada_openai

NOT the LAMBADA data set: a few passages written by hand for megahf's tests (see
`scripts/build_task_fixtures.py`), in the Hub dataset's schema (`text`, split `test`), so that
`megahf evaluate lambada --data <this folder>` runs offline. Numbers computed on it mean nothing.
"""

WIKITEXT_README = """---
configs:
- config_name: wikitext-103-raw-v1
  data_files:
  - split: test
    path: wikitext-103-raw-v1/test-00000-of-00001.parquet
---
# megahf test fixture, laid out like Salesforce/wikitext (wikitext-103-raw-v1)

NOT WikiText-103: a few lines written by hand for megahf's tests (see `scripts/build_task_fixtures.py`), in the Hub
dataset's schema (`text`, one row per line, "" for blank lines, split `test`), so that
`megahf evaluate wikitext --data <this folder>` runs offline. Numbers computed on it mean nothing.
"""


def write_parquet(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path)


NAMES = ["tom", "anna", "mary", "john", "sam", "lucy", "peter", "emma", "jack", "sarah"]
PAST = ["found", "saw", "painted", "visited", "bought", "cleaned", "opened", "sold"]
BASE = ["find", "see", "paint", "visit", "buy", "clean", "open", "sell"]
NOUNS = ["book", "house", "car", "boat", "door", "window", "letter", "table", "garden", "picture"]
PLACES = ["city", "village", "park", "school", "market", "library", "station", "forest"]


def _fill(rng: random.Random, template: str) -> str:
    """A template with {name}, {name2}, {past}, {base}, {noun}, {noun2}, {place} filled at random (a verb's past and
    base forms agree: {past} and {base} share one verb)."""
    verb = rng.randrange(len(PAST))
    name, name2 = rng.sample(NAMES, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    return template.format(name=name, name2=name2, past=PAST[verb], base=BASE[verb], noun=noun, noun2=noun2,
                           place=rng.choice(PLACES))


#: Per GLUE task: its text columns, its label names (Hub order; () for stsb's scores) and, per class, the templates
#: of its texts (one per text column), each class with its own cue words.
GLUE_TASKS = {
    "cola": (("sentence",), ("unacceptable", "acceptable"), [
        [("{name} the {noun} {past} them him .",), ("{past} {name} the the {noun} him .",)],
        [("{name} {past} the {noun} quietly .",), ("{name} quietly {past} the old {noun} .",)],
    ]),
    "sst2": (("sentence",), ("negative", "positive"), [
        [("{name} {past} the {noun} and it was terrible .",), ("an awful and boring day at the {place} .",)],
        [("{name} {past} the {noun} and it was wonderful .",), ("a great and lovely day at the {place} .",)],
    ]),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent"), [
        [("{name} {past} the {noun} in the {place} .", "however , {name2} never saw the {noun2} ."),
         ("{name} {past} a {noun} .", "however , the {noun2} was never there .")],
        [("{name} {past} the {noun} in the {place} .", "indeed , the {noun} was {past} by {name} ."),
         ("{name} {past} a {noun} .", "indeed , {name} {past} the {noun} .")],
    ]),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate"), [
        [("how do i {base} a {noun} ?", "why do people live in a {place} ?"),
         ("where can i {base} a {noun} ?", "why is the {noun2} so old ?")],
        [("how do i {base} a {noun} ?", "what is the best way to {base} a {noun} ?"),
         ("where can i {base} a {noun} ?", "what is the best place to {base} a {noun} ?")],
    ]),
    "stsb": (("sentence1", "sentence2"), (), [
        [("{name} {past} the {noun} .", "the weather was cold and unrelated .")],
        [("{name} {past} the {noun} .", "{name} partly {past} something .")],
        [("{name} {past} the {noun} .", "{name} {past} exactly the {noun} .")],
    ]),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), [
        [("{name} {past} the {noun} in the {place} .", "{name} definitely {past} something ."),
         ("{name} and {name2} {past} a {noun} .", "{name} definitely {past} a {noun} .")],
        [("{name} {past} the {noun} in the {place} .", "{name} perhaps liked the {place} ."),
         ("{name} and {name2} {past} a {noun} .", "{name2} perhaps wanted a {noun2} .")],
        [("{name} {past} the {noun} in the {place} .", "{name} never {past} anything ."),
         ("{name} and {name2} {past} a {noun} .", "nobody ever {past} a {noun} .")],
    ]),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment"), [
        [("where did {name} {base} the {noun} ?", "{name} {past} the {noun} yesterday in the {place} ."),
         ("what did {name} {base} ?", "yesterday {name} {past} a {noun} .")],
        [("where did {name} {base} the {noun} ?", "the weather in the {place} is often cold ."),
         ("what did {name} {base} ?", "the weather was cold in the {place} .")],
    ]),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), [
        [("{name} {past} the {noun} in the {place} last year .", "{name} certainly {past} the {noun} ."),
         ("the {noun} was {past} by {name} .", "{name} certainly {past} it .")],
        [("{name} {past} the {noun} in the {place} last year .", "{name} did not {base} the {noun} ."),
         ("the {noun} was {past} by {name} .", "{name2} did not {base} it .")],
    ]),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment"), [
        [("the {noun} did not fit in the {noun2} because it was too small .", "the {noun} was too small ."),
         ("{name} could not lift {name2} because he was weak .", "{name2} was weak .")],
        [("the {noun} did not fit in the {noun2} because it was too big .", "the {noun} was too big ."),
         ("{name} could not lift {name2} because he was heavy .", "{name2} was heavy .")],
    ]),
}

GLUE_SPLITS = {"train": 64, "validation": 32, "test": 16}
MNLI_SPLITS = {"train": 64, "validation_matched": 32, "validation_mismatched": 32, "test_matched": 16,
               "test_mismatched": 16}
STSB_SCORES = [(0.0, 0.4, 0.8, 1.2), (2.0, 2.4, 2.8, 3.2), (4.0, 4.4, 4.8, 5.0)]  # per cue class

GLUE_README_HEAD = """---
configs:
"""
GLUE_README_BODY = """---
# megahf test fixture, laid out like nyu-mll/glue

NOT the GLUE data: a few dozen rows per split generated from templates by `scripts/build_task_fixtures.py` for
megahf's tests and `megahf finetune --smoke`, in the Hub dataset's schema (its columns, ClassLabel labels, stsb's
float32 scores, test labels -1). Each class has its own cue words (e.g. sst2: positive "wonderful", negative
"terrible"), so a tiny model learns them in a few dozen steps. Numbers computed on it mean nothing.
"""

RACE_README_BODY = """---
# megahf test fixture, laid out like ehovy/race

NOT the RACE data: a few articles generated from templates by `scripts/build_task_fixtures.py` for megahf's tests
and `megahf finetune --smoke`, in the Hub dataset's schema (`example_id`, `article`, `answer` (A-D), `question`,
`options` (4 strings); configs all, high, middle; `example_id` "high1000.txt"/"middle1100.txt" as in the real
data). The right option is a word of the article, the wrong ones come from words no article uses. Numbers computed
on it mean nothing.
"""

FRUITS = ["apple", "orange", "banana", "lemon", "cherry", "peach", "grape", "pear"]
ANIMALS = ["dog", "cat", "horse", "rabbit", "bird", "cow", "sheep", "fox"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
#: RACE's wrong options: words no fixture article contains.
DISTRACTORS = ["hammer", "ladder", "pencil", "bucket", "blanket", "candle", "rope", "shovel", "kettle", "wallet"]


def _glue_rows(rng: random.Random, name: str, count: int, labeled: bool) -> dict[str, list]:
    columns, label_names, classes = GLUE_TASKS[name]
    rows: dict[str, list] = {c: [] for c in (*columns, "label")}
    for index in range(count):
        cls = index % len(classes)  # balanced classes, then shuffled below
        for column, template in zip(columns, rng.choice(classes[cls])):
            rows[column].append(_fill(rng, template))
        label = rng.choice(STSB_SCORES[cls]) if not label_names else cls
        rows["label"].append(label if labeled else -1)
    order = list(range(count))
    rng.shuffle(order)
    rows = {c: [values[i] for i in order] for c, values in rows.items()}
    rows["idx"] = list(range(count))
    return rows


def _glue_features(name: str) -> datasets.Features:
    columns, label_names, _ = GLUE_TASKS[name]
    label = datasets.ClassLabel(names=list(label_names)) if label_names else datasets.Value("float32")
    return datasets.Features({**{c: datasets.Value("string") for c in columns}, "label": label,
                              "idx": datasets.Value("int32")})


def _race_article(rng: random.Random, level: str) -> tuple[str, list[tuple[str, str]]]:
    """An article and its two (question, right answer) pairs; a high-school article has one more sentence."""
    name, name2 = rng.sample(NAMES, 2)
    place, fruit, animal, day = rng.choice(PLACES), rng.choice(FRUITS), rng.choice(ANIMALS), rng.choice(DAYS)
    article = (f"{name} went to the {place} on {day} . there {name} ate an {fruit} and saw a {animal} . "
               f"later {name} met {name2} and they walked home together .")
    if level == "high":
        article += f" {name2} said that the {animal} at the {place} was the best part of the day ."
    questions = [(f"what did {name} eat at the {place} ?", fruit), (f"{name} saw a _ at the {place} .", animal)]
    return article, questions


def _race_rows(rng: random.Random, level: str, count: int, first_id: int) -> dict[str, list]:
    rows: dict[str, list] = {"example_id": [], "article": [], "answer": [], "question": [], "options": []}
    for article_number in range(count // 2):
        article, questions = _race_article(rng, level)
        for question, right in questions:
            options = rng.sample(DISTRACTORS, 3)
            position = rng.randrange(4)
            options.insert(position, right)
            rows["example_id"].append(f"{level}{first_id + article_number}.txt")
            rows["article"].append(article)
            rows["answer"].append("ABCD"[position])
            rows["question"].append(question)
            rows["options"].append(options)
    return rows


RACE_FEATURES = datasets.Features({"example_id": datasets.Value("string"), "article": datasets.Value("string"),
                                   "answer": datasets.Value("string"), "question": datasets.Value("string"),
                                   "options": datasets.List(datasets.Value("string"))})
RACE_SPLITS = {"train": 32, "validation": 16, "test": 8}  # per level; `all` has both levels


def _write_rows(path: Path, rows: dict[str, list], features: datasets.Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def _readme(configs: dict[str, list[str]], body: str) -> str:
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-00000-of-00001.parquet"]
    return "\n".join(lines) + "\n" + body


def _check_vocabulary(texts: list[str]) -> None:
    """Every word must be one entry of the shipped bert-uncased vocabulary (no [UNK], no word pieces)."""
    from megahf.assets import load_bert_tokenizer

    vocab = load_bert_tokenizer().get_vocab()
    unknown = sorted({w for t in texts for w in t.split() if w not in vocab})
    if unknown:
        raise SystemExit(f"words not in the bert-uncased vocabulary: {unknown}")


def build_glue(root: Path) -> list[str]:
    rng = random.Random(1234)
    texts, configs = [], {}
    for name, (columns, label_names, _) in GLUE_TASKS.items():
        splits = MNLI_SPLITS if name == "mnli" else GLUE_SPLITS
        configs[name] = list(splits)
        for split, count in splits.items():
            rows = _glue_rows(rng, name, count, labeled=not split.startswith("test"))
            _write_rows(root / name / f"{split}-00000-of-00001.parquet", rows, _glue_features(name))
            texts += [t for c in columns for t in rows[c]]
    (root / "README.md").write_text(_readme(configs, GLUE_README_BODY), encoding="utf-8")
    return texts


def build_race(root: Path) -> list[str]:
    rng = random.Random(4321)
    texts = []
    joined: dict[str, dict[str, list]] = {}
    for level_number, level in enumerate(("high", "middle")):
        for split_number, (split, count) in enumerate(RACE_SPLITS.items()):
            rows = _race_rows(rng, level, count, first_id=1000 * (1 + split_number) + 100 * level_number)
            _write_rows(root / level / f"{split}-00000-of-00001.parquet", rows, RACE_FEATURES)
            for column, values in rows.items():
                joined.setdefault(split, {}).setdefault(column, []).extend(values)
            texts += rows["article"] + rows["question"] + [o for options in rows["options"] for o in options]
    for split, rows in joined.items():
        _write_rows(root / "all" / f"{split}-00000-of-00001.parquet", rows, RACE_FEATURES)
    configs = {config: list(RACE_SPLITS) for config in ("all", "high", "middle")}
    (root / "README.md").write_text(_readme(configs, RACE_README_BODY), encoding="utf-8")
    return texts


def main() -> None:
    datasets.disable_progress_bars()
    lambada = ROOT / "lambada_openai"
    write_parquet(lambada / "default" / "test-00000-of-00001.parquet", LAMBADA)
    (lambada / "README.md").write_text(LAMBADA_README, encoding="utf-8")
    (ROOT / "lambada_openai.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA),
                                               encoding="utf-8")
    wiki = ROOT / "wikitext"
    write_parquet(wiki / "wikitext-103-raw-v1" / "test-00000-of-00001.parquet", WIKITEXT_ROWS)
    (wiki / "README.md").write_text(WIKITEXT_README, encoding="utf-8")
    (ROOT / "wiki.test.raw").write_text("".join(WIKITEXT_ROWS), encoding="utf-8")
    _check_vocabulary(build_glue(ROOT / "glue") + build_race(ROOT / "race"))


if __name__ == "__main__":
    main()
