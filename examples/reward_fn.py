"""Example user reward function for remesh.

Use it from a config as a reward term named ``examples/reward_fn.py:mentions_title`` (the path
is relative to the working directory), optionally with arguments, e.g.

    reward:
      terms:
        - {name: vader_sentiment, weight: 1.0}
        - {name: "examples/reward_fn.py:mentions_title", weight: 0.5, args: {bonus: 1.0}}

A reward function takes (prompt, response, answer, meta) and returns a finite float; ``meta``
is the prompt row's "meta" object (plus any extra keys of the row). Raising is fine: the run
stops with an error naming the term and the sample.
"""


def mentions_title(prompt: str, response: str, answer: str | None, meta: dict, bonus: float = 1.0) -> float:
    """``bonus`` if the response mentions the movie title from ``meta["title"]`` (case-insensitive),
    else 0.0. Rows without a title get 0.0."""
    title = (meta.get("title") or "").strip()
    if not title:
        return 0.0
    return bonus if title.casefold() in response.casefold() else 0.0
