"""Training data: records -> token examples -> the per-step sample schedule -> padded batches.

An Example is one sequence: its token ids, which of them carry loss, how many leading tokens the
routers pool over (the prompt, as the engine routes at prefill), and its domain.

  chat record {"prompt", "response"}: the tokenizer's chat template, as Engine.generate(chat=True)
      builds the prompt; loss on the response tokens only; the routers pool over the prompt.
  text record {"text"}: plain LM; loss on every token; the routers pool over every token.

Over-long examples (more than max_len tokens) are truncated or dropped (`overlong`), and counted.
Packing (`pack=True`) concatenates a domain's text examples (EOS-separated) into max_len blocks;
chat examples are never packed (their loss masks and routing prompts are per example).

The schedule: step k of domain d uses samples [k*B, (k+1)*B) of d's stream, where the stream is d's
examples in a fresh seeded permutation per epoch. It depends only on (seed, domain, examples), so
a resumed run, a run on more processes and a run of one domain alone see the same samples.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import torch

from moa_engine.data.records import Record

OVERLONG = ("truncate", "drop")


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[i]: token i is predicted (from tokens < i) and scored
    route_len: int  # the routers pool over input_ids[:route_len]
    domain: str


@dataclass
class EncodeReport:
    """Counts per domain of what encoding did."""

    kept: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        for d in self.kept:
            s = f"{d}: {self.kept[d]}"
            if self.truncated.get(d):
                s += f" ({self.truncated[d]} truncated)"
            if self.dropped.get(d):
                s += f" ({self.dropped[d]} dropped)"
            parts.append(s)
        return ", ".join(parts)


def _ids(encoded) -> list[int]:
    """apply_chat_template's result as a list of ids (transformers 5 returns a BatchEncoding)."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def encode_chat(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(ids, prompt length): the chat-templated prompt with the generation prompt, then the
    response as the template closes it. Without a chat template: plain prompt, response, EOS."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_ids = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True))
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full, len(prompt_ids)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(prompt)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids + response_ids + eos, len(prompt_ids)


def encode_text(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def encode_records(
    records: list[Record], tokenizer, max_len: int, overlong: str = "truncate", pack: bool = False
) -> tuple[list[Example], EncodeReport]:
    """Records -> Examples (in record order; packed text blocks after a domain's chat examples)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {list(OVERLONG)}, got {overlong!r}")
    report = EncodeReport()
    examples: list[Example] = []
    packed: dict[str, list[int]] = {}
    for r in records:
        for table in (report.kept, report.truncated, report.dropped):
            table.setdefault(r.domain, 0)
        if r.is_chat:
            ids, prompt_len = encode_chat(tokenizer, r.prompt, r.response)
            mask = [i >= prompt_len for i in range(len(ids))]
            route_len = prompt_len
        else:
            ids = encode_text(tokenizer, r.text)
            if pack:
                packed.setdefault(r.domain, []).extend(ids)
                continue
            mask = [i > 0 for i in range(len(ids))]
            route_len = len(ids)
        if len(ids) > max_len:
            # A chat example whose prompt fills max_len has no response token left to learn.
            if overlong == "drop" or (r.is_chat and route_len >= max_len):
                report.dropped[r.domain] += 1
                continue
            report.truncated[r.domain] += 1
            ids, mask, route_len = ids[:max_len], mask[:max_len], min(route_len, max_len)
        examples.append(Example(ids, mask, route_len, r.domain))
        report.kept[r.domain] += 1
    for domain, stream in packed.items():
        for start in range(0, len(stream) - 1, max_len):
            block = stream[start : start + max_len]
            if len(block) < 2:
                continue
            examples.append(Example(block, [i > 0 for i in range(len(block))], len(block), domain))
            report.kept[domain] += 1
    empty = [d for d, n in report.kept.items() if n == 0]
    if empty:
        raise ValueError(
            f"domain(s) {empty} have no examples left after encoding with max_len={max_len} "
            f"(dropped: {[report.dropped[d] for d in empty]}); raise --max-len or use --overlong truncate"
        )
    return examples, report


def examples_digest(examples: list[Example]) -> str:
    """A stable hash of the examples (to check that a resumed run trains on the same data)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.domain}|{e.route_len}|".encode())
        h.update(",".join(map(str, e.input_ids)).encode())
        h.update(bytes(e.loss_mask))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


def _stream_seed(seed: int, domain: str, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{domain}:{epoch}".encode()).digest()[:8], "big")


def domain_samples(n: int, batch: int, step: int, seed: int, domain: str) -> list[int]:
    """Indices (into the domain's examples) of the `batch` samples of `step`."""
    out = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(i, n)
        order = list(range(n))
        random.Random(_stream_seed(seed, domain, epoch)).shuffle(order)
        out.append(order[pos])
    return out


def steps_for(n: int, batch: int, steps: int | None, epochs: float | None) -> int:
    """A domain's step count: `steps`, or `epochs` passes over its n examples."""
    if steps is not None:
        return steps
    return max(1, math.ceil(epochs * n / batch))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, -100 where no loss (target of position t is labels[t])
    route_mask: torch.Tensor  # [B, T] float32
    domains: list[int]  # [B] domain index
    tokens: int  # real (non-pad) tokens


def collate(examples: list[Example], domain_index: dict[str, int], pad_id: int) -> Batch:
    """Right-padded tensors. labels[b, t] is input_ids[b, t + 1] where that token carries loss."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    attn = torch.zeros(B, T, dtype=torch.int64)
    labels = torch.full((B, T), -100, dtype=torch.int64)
    route = torch.zeros(B, T, dtype=torch.float32)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        attn[b, :n] = 1
        route[b, : e.route_len] = 1
        target = torch.tensor(e.input_ids[1:])
        keep = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        labels[b, : n - 1] = torch.where(keep, target, torch.full_like(target, -100))
    return Batch(ids, attn, labels, route, [domain_index[e.domain] for e in examples], int(attn.sum()))
