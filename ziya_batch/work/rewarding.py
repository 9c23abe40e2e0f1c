"""The rewards of a shard's samples: the reward model's score, the reward function's and the reward URL's,
kept by name under `rewards` and summed with experience.reward_weights into `reward` (reward_runner.py
runs the function and the URL). Plain Python over the scorers: tested on the CPU."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from . import reward_runner
from ..records import LineResult, SampleOutput

if TYPE_CHECKING:
    from ..spec import ExperienceSpec


def prompt_of(r: LineResult):
    """What a reward sees as the prompt: the line's prompt string, or its messages list."""
    return r.line.messages if r.line.messages is not None else r.line.query


def score_rewards(pairs: list[tuple[LineResult, SampleOutput]], reward_scorer=None,
                  experience: Optional["ExperienceSpec"] = None) -> None:
    """Set reward, rewards and reward_error on every sample of `pairs` (nothing if no reward is configured)."""
    prompts = [prompt_of(r) for r, _ in pairs]
    responses = [s.text for _, s in pairs]
    components: dict[str, list[reward_runner.Score]] = {}
    if reward_scorer is not None:
        # a reward model failing is the worker's failure (out of memory, a bad checkpoint): it raises as before
        components[reward_runner.MODEL] = [(float(v), None) for v in reward_scorer.score(prompts, responses)]
    if experience is not None and (experience.reward_function or experience.reward_url):
        items = [(p, t, r.line.metadata) for p, t, (r, _) in zip(prompts, responses, pairs)]
        if experience.reward_function:
            name = reward_runner.function_name(experience.reward_function)
            runner = reward_runner.function_rewards(experience.reward_function, experience.reward_timeout_s)
            components[name] = runner.score(items)
        if experience.reward_url:
            components[reward_runner.URL] = reward_runner.UrlRewards(
                experience.reward_url, experience.reward_timeout_s).score(items)
    if not components:
        return
    weights = dict(experience.reward_weights) if experience is not None else {}
    for (_, s), (total, values, error) in zip(pairs, reward_runner.combine(components, weights, len(pairs))):
        s.reward, s.rewards, s.reward_error = total, values, error
