"""Write megahf's tiny hand-written evaluation fixtures under src/megahf/assets/fixtures/ (run from the repo root).

They are NOT the real LAMBADA or WikiText-103 data (no package ships those): a few sentences written for megahf's
tests, stored in the exact Hub schemas so that the code paths that read the real data are exercised offline:

* `lambada_openai/`: laid out like the Hub dataset EleutherAI/lambada_openai (`text`, split `test`), plus
  `lambada_openai.jsonl`, the same passages in Megatron's input format (one {"text": ...} per line);
* `wikitext/`: laid out like Salesforce/wikitext, config wikitext-103-raw-v1 (`text`, one row per line, "" for a
  blank line, a heading like " = Title = \\n", each line keeping its "\\n"), split test, plus `wiki.test.raw`, the rows
  joined (the raw-file form Megatron reads).
"""

from __future__ import annotations

import json
from pathlib import Path

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


def main() -> None:
    lambada = ROOT / "lambada_openai"
    write_parquet(lambada / "default" / "test-00000-of-00001.parquet", LAMBADA)
    (lambada / "README.md").write_text(LAMBADA_README, encoding="utf-8")
    (ROOT / "lambada_openai.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA),
                                               encoding="utf-8")
    wiki = ROOT / "wikitext"
    write_parquet(wiki / "wikitext-103-raw-v1" / "test-00000-of-00001.parquet", WIKITEXT_ROWS)
    (wiki / "README.md").write_text(WIKITEXT_README, encoding="utf-8")
    (ROOT / "wiki.test.raw").write_text("".join(WIKITEXT_ROWS), encoding="utf-8")


if __name__ == "__main__":
    main()
