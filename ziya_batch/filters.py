"""Which samples become SFT records, and the GRPO view of a prompt's n samples. Plain Python, no torch.

SFT filters (output.filters in the job spec) apply to sft/ records only; results/ and experience/ always
hold every sample. One SftFilter serves one shard: duplicates are detected within the shard (part), which
keeps a retried shard's output identical to its first attempt's.

GRPO: the n samples of one prompt form a group; each experience record gets the group's reward mean and
standard deviation and its advantage (r - mean) / (std + 1e-6). The standard deviation is the sample one
(n - 1 in the denominator), as TRL's GRPO trainer and OpenRLHF's group normalisation compute it with
torch.std; a group of one sample has std 0 and advantage 0.
"""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Optional, Sequence

from .records import LineResult, SampleOutput
from .spec import FiltersSpec

ADVANTAGE_EPS = 1e-6

# reasons a sample is left out of sft/, counted per shard
TRUNCATED = "truncated"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NO_REWARD = "no_reward"
LOW_REWARD = "low_reward"
DUPLICATE = "duplicate"

_WHITESPACE = re.compile(r"\s+")


def normalize_response(text: str) -> str:
    """NFKC (full-width and compatibility forms folded), runs of whitespace made one space, ends stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def response_hash(text: str) -> str:
    return hashlib.sha256(normalize_response(text).encode("utf-8")).hexdigest()


class SftFilter:
    """Decides, sample by sample and in order, which samples of one shard become SFT records."""

    def __init__(self, spec: FiltersSpec):
        self.spec = spec
        self._seen: set[str] = set()
        self.dropped: Counter[str] = Counter()   # reason -> samples dropped
        self.kept = 0

    def drop_reason(self, sample: SampleOutput) -> Optional[str]:
        """Why this sample is left out, or None to keep it. Does not record anything."""
        spec = self.spec
        if spec.drop_truncated and sample.finish_reason == "length":
            return TRUNCATED
        n = len(sample.token_ids)
        if n < spec.min_response_tokens:
            return TOO_SHORT
        if spec.max_response_tokens is not None and n > spec.max_response_tokens:
            return TOO_LONG
        if spec.min_reward is not None:
            # without a reward the threshold cannot be shown to hold: leave the sample out
            if sample.reward is None or (isinstance(sample.reward, float) and math.isnan(sample.reward)):
                return NO_REWARD
            if sample.reward < spec.min_reward:
                return LOW_REWARD
        if spec.dedup and response_hash(sample.text) in self._seen:
            return DUPLICATE
        return None

    def keep(self, sample: SampleOutput) -> bool:
        """Decide and record: a kept sample's text now counts for deduplication of later ones."""
        reason = self.drop_reason(sample)
        if reason is not None:
            self.dropped[reason] += 1
            return False
        if self.spec.dedup:
            # only kept samples claim their text, so a dropped sample never hides a good duplicate
            self._seen.add(response_hash(sample.text))
        self.kept += 1
        return True

    def select(self, results: Iterable[LineResult]) -> list[tuple[LineResult, SampleOutput]]:
        """The (line, sample) pairs of a shard's results that become SFT records, in order."""
        return [(r, s) for r in results for s in r.samples if self.keep(s)]


def filter_sft(results: Sequence[LineResult], spec: FiltersSpec) -> list[tuple[LineResult, SampleOutput]]:
    """One shard's SFT selection (a fresh SftFilter per call)."""
    return SftFilter(spec).select(results)


def group_stats(rewards: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """(mean, sample std) of the rewards that are present; (None, None) if none is; std 0 for one."""
    values = [float(r) for r in rewards if r is not None and not math.isnan(r)]
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def advantage(reward: Optional[float], mean: Optional[float], std: Optional[float]) -> Optional[float]:
    if reward is None or mean is None or std is None or math.isnan(reward):
        return None
    return (reward - mean) / (std + ADVANTAGE_EPS)


def constant_reward(samples: Sequence[SampleOutput]) -> bool:
    """Every sample of the group has a reward and all are equal: zero advantage, nothing for GRPO to learn (a
    group of one sample included). A group with a null reward is not constant: its rewards are not known."""
    rewards = [s.reward for s in samples]
    if not rewards or any(r is None or math.isnan(r) for r in rewards):
        return False
    return all(r == rewards[0] for r in rewards)


def experience_groups(results: Sequence[LineResult], spec: FiltersSpec) -> list[LineResult]:
    """The lines whose samples become experience records: all, or with drop_constant_reward_groups those
    whose group's rewards differ."""
    if not spec.drop_constant_reward_groups:
        return list(results)
    return [r for r in results if not constant_reward(r.samples)]


def dropped_constant_reward_groups(results: Sequence[LineResult], spec: FiltersSpec) -> int:
    """How many prompts experience_groups leaves out (the manifest summary counts them)."""
    return sum(1 for r in results if constant_reward(r.samples)) if spec.drop_constant_reward_groups else 0


def add_group_fields(records: Sequence[dict], group_id: Optional[str] = None) -> list[dict]:
    """Copies of one prompt's n experience records with group_id, group_reward_mean, group_reward_std and
    advantage added. group_id defaults to the records' own group_id, else their id."""
    if not records:
        return []
    gid = group_id if group_id is not None else (records[0].get("group_id") or records[0]["id"])
    mean, std = group_stats([r.get("reward") for r in records])
    return [{**r, "group_id": gid, "group_reward_mean": mean, "group_reward_std": std,
             "advantage": advantage(r.get("reward"), mean, std)} for r in records]


def add_group_fields_by_prompt(records: Sequence[dict]) -> list[dict]:
    """add_group_fields over a shard's experience records, grouped by group_id (or id), order kept."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get("group_id") or r["id"], []).append(i)
    out: list[dict] = [{} for _ in records]
    for gid, idx in groups.items():
        for i, rec in zip(idx, add_group_fields([records[i] for i in idx], gid)):
            out[i] = rec
    return out
