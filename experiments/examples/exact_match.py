"""A fitness.function: exact-match accuracy of short greedy completions.

``completions.jsonl`` (beside this file) holds prompt/answer pairs cut from the most common lines
of the Python standard library's source: the prompt is a line without its last few characters,
the answer those characters. A member's score is the share of prompts whose greedy completion
(byte tokens, as many as the answer has bytes) is the answer exactly: 0 to 1, higher is better.

    fitness: {function: "experiments.examples.exact_match:exact_match", sense: max}

It needs the bytes tokenizer (data.tokenizer: bytes); with another tokenizer it raises, which marks
each evaluation's score failed (the run goes on). ``python -m experiments.examples.exact_match``
rebuilds the JSONL from this Python's standard library.
"""
from __future__ import annotations

import collections
import functools
import json
import sysconfig
from pathlib import Path

import torch

PAIRS = Path(__file__).with_name("completions.jsonl")
BYTES_VOCAB = 256


@functools.lru_cache(maxsize=1)
def pairs() -> list[tuple[bytes, bytes]]:
    """The (prompt, answer) pairs of completions.jsonl, as UTF-8 bytes."""
    out = []
    for line in PAIRS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append((d["prompt"].encode("utf-8"), d["answer"].encode("utf-8")))
    return out


def exact_match(model: torch.nn.Module, batches: dict, device: torch.device) -> float:
    """Share of the pairs whose greedy completion of the prompt is the answer, byte for byte.
    ``batches`` (the held-out batches) is not used: the pairs are this metric's own held-out set."""
    vocab = model.config.vocab_size
    if vocab != BYTES_VOCAB:
        raise ValueError(f"exact_match needs the bytes tokenizer (vocab 256), the model has {vocab}")
    limit = model.config.max_position_embeddings
    hits = 0
    for prompt, answer in pairs():
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        for _ in range(len(answer)):
            logits = model(ids[:, -limit:])                    # (1, T, vocab)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        hits += bytes(ids[0, len(prompt):].tolist()) == answer
    return hits / len(pairs())


def build(n: int = 64, answer_chars: int = 5) -> list[dict]:
    """The n most common stripped lines of the standard library's top-level .py files (12 to 48 ASCII
    characters), each cut before its last ``answer_chars`` characters; a newline and the line's
    usual indentation lead the prompt."""
    root = Path(sysconfig.get_paths()["stdlib"])
    counts: collections.Counter = collections.Counter()
    for path in sorted(root.glob("*.py")):
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if 12 <= len(line) <= 48 and line.isascii() and not line.startswith("#"):
                counts[(raw[: len(raw) - len(raw.lstrip())], line)] += 1
    best: dict[str, tuple[int, str]] = {}
    for (indent, line), c in counts.items():
        if c > best.get(line, (0, ""))[0]:
            best[line] = (c, indent)
    lines = sorted(best, key=lambda ln: (-best[ln][0], ln))[:n]
    return [{"prompt": "\n" + best[ln][1] + ln[:-answer_chars], "answer": ln[-answer_chars:]} for ln in lines]


if __name__ == "__main__":
    PAIRS.write_text("".join(json.dumps(d) + "\n" for d in build()), encoding="utf-8")
    print(f"wrote {PAIRS} ({len(pairs.__wrapped__())} pairs)")
