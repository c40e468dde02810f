"""The imdb-gen labs' judge: does a generated review carry the sentiment it was asked for?

A sentiment classifier trained by peftlab itself reads each generated review; agreement is the share it labels
with the requested sentiment (for the tuned model and for the base model without the adapter).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftlab.labs.lab import SMOKE_BUDGET, fresh_run, smoke


def train_sentiment_judge(output: str | os.PathLike, *, smoke_budget: bool | None = None, **overrides) -> Path:
    """A sentiment classifier trained by peftlab itself (its default method, LoRA, on minilm and IMDB), trained
    once and reused: the judge of :func:`sentiment_agreement`. Safe to call from several notebooks at once."""
    import fcntl

    import peftlab

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    use_smoke = smoke() if smoke_budget is None else smoke_budget
    with open(output.parent / f".{output.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (output / "metrics.json").is_file():
            return output
        fresh_run(output)
        # peftlab's default method (DEFAULT_METHOD: LoRA); 128 tokens: the judge reads short generated reviews;
        # 3 epochs over the 1,600 training reviews
        options = dict(task="imdb", model="minilm", epochs=3, max_length=128, output=str(output))
        if use_smoke:
            options.update(SMOKE_BUDGET, max_length=128)
        options.update(overrides)
        metrics = peftlab.train(**options)
        print(f"sentiment judge: dev accuracy {metrics['metric']:.3f} on {metrics['eval_examples']} IMDB reviews")
    return output


def generate_reviews(loaded, n_per_sentiment: int = 4, max_new_tokens: int = 48, *, sample: bool = True,
                     seed: int = 0) -> list[dict[str, str]]:
    """``n_per_sentiment`` reviews for each sentiment from the imdb-gen prompts. Sampled (top-p 0.95,
    seeded) by default: greedy decoding would write the same review ``n`` times."""
    import torch

    from peftlab.evaluation import model_device
    from peftlab.tasks.imdb_gen import prompt_for

    tokenizer, model = loaded.tokenizer, loaded.model
    requests = [s for s in ("positive", "negative") for _ in range(n_per_sentiment)]
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    encoded = tokenizer([prompt_for(s) for s in requests], return_tensors="pt", padding=True).to(model_device(model))
    torch.manual_seed(seed)
    options = dict(do_sample=True, top_p=0.95, top_k=0, temperature=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **options)
    texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"requested": s, "review": t.strip()} for s, t in zip(requests, texts)]


def sentiment_agreement(reviews: list[dict[str, str]], judge) -> dict[str, Any]:
    """How often the judge (a peftlab sentiment classifier run folder or ``Loaded``) labels each generated
    review with the requested sentiment. Empty reviews count as disagreement."""
    from peftlab.inference import predict

    texts = [r["review"] if r["review"].strip() else "." for r in reviews]
    predictions = predict(judge, texts)
    wanted = {"positive": "1", "negative": "0"}
    rows, agree = [], 0
    for review, prediction in zip(reviews, predictions):
        ok = bool(review["review"].strip()) and prediction["label"] == wanted[review["requested"]]
        agree += ok
        rows.append({**review, "judged": "positive" if prediction["label"] == "1" else "negative",
                     "p(positive)": round(prediction["probabilities"].get("1", 0.0), 3), "agrees": ok})
    per_class = {}
    for sentiment in ("positive", "negative"):
        subset = [r for r in rows if r["requested"] == sentiment]
        per_class[sentiment] = sum(r["agrees"] for r in subset) / max(1, len(subset))
    return {"agreement": agree / max(1, len(rows)), "per_sentiment": per_class, "rows": rows}


__all__ = ["train_sentiment_judge", "generate_reviews", "sentiment_agreement"]
