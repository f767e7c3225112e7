"""Rebuild demo_tokenizer.model: a 350-piece SentencePiece model for random-weight demos.

It stands in for PaliGemma's tokenizer (which comes with users' checkpoints) only so that a demo with
no checkpoint has real tokens to feed; it is never used with trained weights. Run from this folder:
    python make_demo_tokenizer.py
"""

import io
import random

import sentencepiece

OBJECTS = [
    "black bowl",
    "plate",
    "ketchup",
    "alphabet soup",
    "cream cheese",
    "butter",
    "milk",
    "orange juice",
    "tomato sauce",
    "bbq sauce",
    "salad dressing",
    "wine bottle",
    "mug",
    "moka pot",
    "basket",
    "drawer",
    "stove",
    "microwave",
    "cabinet",
    "book",
    "caddy",
    "cookie box",
    "ramekin",
    "wooden cabinet",
]
VERBS = [
    "pick up the",
    "put the",
    "open the",
    "close the",
    "turn on the",
    "place the",
    "push the",
    "stack the",
]
PLACES = [
    "on the plate",
    "in the basket",
    "on top of the cabinet",
    "in the top drawer",
    "on the stove",
    "next to the ramekin",
    "between the plate and the ramekin",
    "on the wooden tray",
]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        instruction = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        state = " ".join(str(rng.randrange(256)) for _ in range(rng.randrange(4, 15)))
        lines.append(f"Task: {instruction}, State: {state};\nAction: ")
    return lines


if __name__ == "__main__":
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(4000)),
        model_writer=model,
        vocab_size=350,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        split_digits=True,
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    with open("demo_tokenizer.model", "wb") as f:
        f.write(model.getvalue())
