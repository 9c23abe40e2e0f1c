"""bench --logprobs variants parse (the runs themselves need a GPU)."""
import pytest

from ziya_batch.tools.bench import parse_logprobs_variant
from ziya_batch.errors import ModelError


def test_variants():
    assert parse_logprobs_variant("processed") == {"logprobs_mode": "processed", "top_logprobs": 0}
    assert parse_logprobs_variant("temperature+top5") == {"logprobs_mode": "temperature", "top_logprobs": 5}
    for bad in ("temp", "temperature+top21", "raw+topx", "raw+5"):
        with pytest.raises(ModelError, match="MODE"):
            parse_logprobs_variant(bad)
