"""Reference logprobs and rewards agree with a direct, unbatched transformers forward."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaModel

from ziya_batch.engine.scoring import ReferenceScorer, RewardScorer, detect_reward_layout, reward_text
from ziya_batch.errors import ModelError
from ziya_batch.prompts import build_prompt
from ziya_batch.tools.demo_model import write_demo_reference_model, write_demo_reward_model

QUERIES = ["帮我写一份去西安的旅游计划", "What is 17% of 240?", "写一首关于秋天的诗。"]
RESPONSES = ["第一天去兵马俑,第二天逛城墙。", "40.8", "秋风吹过稻田边,金色波浪卷向天。\n雁字南飞声渐远。"]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return write_demo_reference_model(tmp_path_factory.mktemp("ref") / "m")


@pytest.fixture(scope="module")
def tok(ref_dir):
    return AutoTokenizer.from_pretrained(str(ref_dir))


def _pairs(tok):
    prompts = [tok(build_prompt(q)).input_ids for q in QUERIES] + [[1]]
    responses = [tok.encode(r, add_special_tokens=False) + [2] for r in RESPONSES] + [[5, 6, 7, 8, 9, 10, 11]]
    return prompts, responses


@pytest.mark.parametrize("max_batch_tokens", [8192, 40])  # one padded batch; many small ones
def test_reference_logprobs_match_a_direct_forward(ref_dir, tok, max_batch_tokens):
    prompts, responses = _pairs(tok)
    scorer = ReferenceScorer(ref_dir, "cpu", "float32", max_batch_tokens=max_batch_tokens)
    got = scorer.logprobs(prompts, responses)
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    for p, r, lp in zip(prompts, responses, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0]  # [S, V]
        want = [logits[len(p) + j - 1].log_softmax(-1)[tok_id].item() for j, tok_id in enumerate(r)]
        assert len(lp) == len(r)
        assert lp == pytest.approx(want, abs=1e-5)
        assert all(x < 0 for x in lp)


def test_reference_edge_cases(ref_dir):
    scorer = ReferenceScorer(ref_dir)
    assert scorer.logprobs([[1, 5], [1]], [[], [9]])[0] == []
    with pytest.raises(ValueError):
        scorer.logprobs([[]], [[5]])
    with pytest.raises(ValueError):
        scorer.logprobs([[1]], [])
    with pytest.raises(ModelError):
        scorer.logprobs([[1] * 1000], [[5] * 100])  # past the 1024 positions
    with pytest.raises(ModelError):
        ReferenceScorer(ref_dir / "missing")
    assert ReferenceScorer(ref_dir, "cpu", "float16").model.dtype == torch.float32  # the CPU runs float32


class _ZiyaReward(torch.nn.Module):
    """Ziya-LLaMA-7B-Reward's forward, written out: LlamaModel, value_head at the last real token, mean."""

    def __init__(self, path):
        super().__init__()
        self.model = LlamaModel(LlamaConfig.from_pretrained(str(path)))
        sd = load_file(str(path / "model.safetensors"))
        self.value_head = torch.nn.Linear(sd["value_head.weight"].shape[1], sd["value_head.weight"].shape[0], bias=False)
        self.load_state_dict(sd, strict=True)
        self.eval()

    @torch.no_grad()
    def forward(self, ids):
        h = self.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return self.value_head(h).mean().item()


def test_ziya_reward_layout_matches_its_forward(tmp_path):
    path = write_demo_reward_model(tmp_path / "rm", layout="ziya")
    assert detect_reward_layout(path) == "ziya"
    scorer = RewardScorer(path, max_batch_tokens=64)
    assert scorer.layout == "ziya"
    tok = AutoTokenizer.from_pretrained(str(path))
    got = scorer.score(QUERIES, RESPONSES)
    ref = _ZiyaReward(path)
    for q, r, g in zip(QUERIES, RESPONSES, got):
        ids = [1] + tok.encode("Human:" + q + "\n\nAssistant:" + r, add_special_tokens=False) + [2]
        assert scorer.encode(q, r) == ids
        assert g == pytest.approx(ref(ids), abs=1e-5)
    assert len(set(round(g, 6) for g in got)) == len(got)  # rewards differ between samples


def test_seqcls_reward_layout_matches_its_forward(tmp_path):
    path = write_demo_reward_model(tmp_path / "rm", layout="seqcls")
    assert detect_reward_layout(path) == "seqcls"
    scorer = RewardScorer(path, max_batch_tokens=100)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    got = scorer.score(QUERIES, RESPONSES)
    for q, r, g in zip(QUERIES, RESPONSES, got):
        ids = tok("Human:" + q + "\n\nAssistant:" + r).input_ids
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, 0].item()
        assert g == pytest.approx(want, abs=1e-5)


def test_seqcls_uses_the_chat_template_when_there_is_one(tmp_path):
    path = write_demo_reward_model(tmp_path / "rm", layout="seqcls")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    scorer = RewardScorer(path)
    ids = scorer.encode("hi", "hello")
    assert scorer.tokenizer.decode(ids) == "<user>hi<assistant>hello"


def test_conversation_prompts():
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert reward_text(conv, "a2") == "Human:q1\n\nAssistant:a1\n\nHuman:q2\n\nAssistant:a2"
    assert reward_text("q", "a") == "Human:q\n\nAssistant:a"


def test_conversation_scores_and_length_mismatch(tmp_path):
    path = write_demo_reward_model(tmp_path / "rm", layout="ziya")
    scorer = RewardScorer(path)
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}, {"role": "user", "content": "再见"}]
    [a, b] = scorer.score([conv, "再见"], ["再见!", "再见!"])
    assert a != b  # the earlier turns are part of what is scored
    with pytest.raises(ValueError):
        scorer.score(["a"], [])


def test_a_multi_label_classifier_is_refused(tmp_path):
    from transformers import LlamaForSequenceClassification

    from ziya_batch.tools.demo_model import demo_config, write_demo_tokenizer

    cfg = demo_config()
    cfg.num_labels = 3
    LlamaForSequenceClassification(cfg).save_pretrained(str(tmp_path / "m"))
    write_demo_tokenizer(tmp_path / "m")
    with pytest.raises(ModelError, match="3 labels"):
        RewardScorer(tmp_path / "m")
