"""Scoring generated samples for experience records: reference-model logprobs and reward-model scores.

ReferenceScorer: the logprob of each response token under a reference causal LM, for ref_logprobs and the
per-token KL: log-softmax of the logits divided by the sample's temperature (experience.logprobs_mode
temperature; 1 for greedy samples and for raw mode), the definition the policy's logprobs use, so the KL of
the policy against itself is zero.

RewardScorer: one scalar per (prompt, response), from either of two checkpoint layouts:
- "ziya": Ziya-LLaMA-7B-Reward's. A LlamaModel (`model.*` weights) plus `value_head` (Linear(hidden, k),
  no bias; k = 1, or its model-parallel width, averaged), read at the last non-pad token. Its remote code is
  not run: we build the same two modules from transformers' own LlamaModel, so trust_remote_code stays off.
  Text: "Human:" + query + "\\n\\nAssistant:" + response, with BOS and EOS (its card loads the tokenizer
  with add_eos_token=True, so the score is read at EOS). Earlier turns of a conversation come first, as
  "Human:" q "\\n\\nAssistant:" a "\\n\\n".
- "seqcls": transformers' AutoModelForSequenceClassification with num_labels 1 (the config's pad_token_id
  picks the last token). If its tokenizer has a chat template, the conversation plus the response as the
  assistant turn is rendered with it; otherwise the same Human/Assistant text, with the tokenizer's own
  special-token settings.
The layout is detected from the checkpoint's weight names (a `value_head.weight` means "ziya").

Both run float32 on the CPU whatever dtype is asked for (as the job spec's model.dtype does), batch by a
token budget, right-pad with the pad id and pass an attention mask. Texts longer than the
model's context keep their END (where the score is read), dropping tokens after BOS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..errors import ModelError
from .merge_delta import CheckpointReader
from .types import PAD_ID

Conversation = list[dict]          # [{"role": "user"|"assistant", "content": str}, ...], ending with user
PromptLike = Union[str, Conversation]

HUMAN_PREFIX = "Human:"
ASSISTANT_PREFIX = "\n\nAssistant:"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype: str, device: Optional[torch.device] = None) -> torch.dtype:
    """The dtype to run in; the CPU always runs float32 (as the job spec's model.dtype says)."""
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if device is not None and device.type == "cpu":
        return torch.float32
    return _DTYPES[dtype]


def _batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that (longest in group) x (group size) stays within the budget; sorted by length
    so that padding is small. A sequence longer than the budget runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] * (len(groups[-1]) + 1) <= max_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _right_padded(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


class ReferenceScorer:
    """Logprobs of given responses under a reference causal LM."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "float32", *,
                 max_batch_tokens: int = 8192, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        self.device = _device(device)
        self.max_batch_tokens = max_batch_tokens
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(model_path), dtype=_dtype(dtype, self.device), trust_remote_code=trust_remote_code
            ).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise ModelError(f"reference model {model_path}: cannot load ({err})") from None
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else PAD_ID
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                 temperatures: Optional[Sequence[float]] = None) -> list[list[float]]:
        """logprob of response_ids[i][j] given prompt_ids[i] + response_ids[i][:j], for every i, j, under
        log_softmax(logits / temperatures[i]) (1 where not given or 0: greedy)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        temps = [t if t and t > 0 else 1.0 for t in (temperatures or [1.0] * len(prompt_ids))]
        out: list[list[float]] = [[] for _ in prompt_ids]
        todo = []
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            if not r:
                continue
            if not p:
                raise ValueError(f"prompt {i} is empty: the first response token needs a context (at least BOS)")
            if self.max_len is not None and len(p) + len(r) > self.max_len:
                raise ModelError(f"prompt {i} + response is {len(p) + len(r)} tokens, more than the reference "
                                 f"model's {self.max_len} positions")
            todo.append(i)
        lengths = [len(prompt_ids[i]) + len(response_ids[i]) for i in todo]
        for group in _batches(lengths, self.max_batch_tokens):
            rows = [todo[g] for g in group]
            seqs = [list(prompt_ids[i]) + list(response_ids[i]) for i in rows]
            ids, mask = _right_padded(seqs, self.pad_id, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
            for row, i in enumerate(rows):
                p, r = len(prompt_ids[i]), len(response_ids[i])
                # the token at position t is predicted by the logits at t - 1
                # the same float32 division the policy's sampler does (sampling.sample_full)
                lp = (logits[row, p - 1: p + r - 1].float() / temps[i]).log_softmax(dim=-1)  # [R, V]
                target = ids[row, p: p + r].unsqueeze(-1)  # [R, 1]
                out[i] = lp.gather(-1, target).squeeze(-1).tolist()
        return out


def detect_reward_layout(model_path: str | Path) -> str:
    """'ziya' if the checkpoint has a value_head (Ziya-LLaMA-7B-Reward), else 'seqcls'."""
    names = CheckpointReader(model_path, "reward model").tensors
    return "ziya" if any(n == "value_head.weight" or n.endswith(".value_head.weight") for n in names) else "seqcls"


def reward_text(prompt: PromptLike, response: str) -> str:
    """Human/Assistant text of a query (or a conversation ending with a user turn) and a response."""
    if isinstance(prompt, str):
        return HUMAN_PREFIX + prompt + ASSISTANT_PREFIX + response
    parts = []
    for m in prompt:
        if m["role"] == "user":
            parts.append(("\n\n" if parts else "") + HUMAN_PREFIX + m["content"])
        else:
            parts.append(ASSISTANT_PREFIX + m["content"])
    return "".join(parts) + ASSISTANT_PREFIX + response


class RewardScorer:
    """Scalar rewards from a Ziya-LLaMA-7B-Reward checkpoint or a 1-label sequence classifier."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "float32", *,
                 max_batch_tokens: int = 8192, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.device = _device(device)
        self.max_batch_tokens = max_batch_tokens
        self.layout = detect_reward_layout(model_path)
        torch_dtype = _dtype(dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelError(f"reward model {model_path}: cannot load its tokenizer ({err})") from None
        if self.layout == "ziya":
            self._load_ziya(model_path, torch_dtype)
        else:
            self._load_seqcls(model_path, torch_dtype, trust_remote_code)
        self.max_len = getattr(self.config, "max_position_embeddings", None)

    def _load_ziya(self, model_path, torch_dtype) -> None:
        from transformers import LlamaConfig, LlamaModel
        from transformers.utils import logging as hf_logging

        self.config = LlamaConfig.from_pretrained(str(model_path))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # value_head is "unexpected" for LlamaModel: loaded just below
        try:
            self.model = LlamaModel.from_pretrained(str(model_path), dtype=torch_dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        weight = CheckpointReader(model_path, "reward model")
        name = next(n for n in weight.tensors if n == "value_head.weight" or n.endswith(".value_head.weight"))
        w = weight.get(name)  # [k, H]
        if w.dim() != 2 or w.shape[1] != self.config.hidden_size:
            raise ModelError(f"reward model {model_path}: {name} has shape {list(w.shape)}, expected "
                             f"[k, {self.config.hidden_size}]")
        self.value_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch_dtype)
        with torch.no_grad():
            self.value_head.weight.copy_(w.to(torch_dtype))
        self.model.to(self.device).eval()
        self.value_head.to(self.device).eval()
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else PAD_ID

    def _load_seqcls(self, model_path, torch_dtype, trust_remote_code) -> None:
        from transformers import AutoModelForSequenceClassification

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(model_path), dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelError(f"reward model {model_path}: not a Ziya reward checkpoint (no value_head.weight) and "
                             f"not loadable as a sequence classifier ({err})") from None
        self.config = self.model.config
        if self.config.num_labels != 1:
            raise ModelError(f"reward model {model_path}: a sequence classifier with {self.config.num_labels} "
                             "labels; a reward model has exactly one")
        pad = self.config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else PAD_ID
            self.config.pad_token_id = pad  # the classifier finds each row's last token through it
        self.pad_id = pad
        self.model.to(self.device).eval()

    def encode(self, prompt: PromptLike, response: str) -> list[int]:
        """The token ids the reward model reads for one sample."""
        tok = self.tokenizer
        if self.layout == "seqcls" and getattr(tok, "chat_template", None):
            conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = tok.apply_chat_template(conv + [{"role": "assistant", "content": response}], tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tok(reward_text(prompt, response), add_special_tokens=True).input_ids
            if self.layout == "ziya":
                bos, eos = self.config.bos_token_id, self.config.eos_token_id
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos] + ids
                if eos is not None and ids[-1] != eos:
                    ids = ids + [eos]
        if self.max_len is not None and len(ids) > self.max_len:
            ids = ids[:1] + ids[len(ids) - self.max_len + 1:]  # keep BOS and the end, where the score is read
        return ids

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        out = [0.0] * len(seqs)
        for group in _batches([len(s) for s in seqs], self.max_batch_tokens):
            ids, mask = _right_padded([list(seqs[g]) for g in group], self.pad_id, self.device)
            if self.layout == "ziya":
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, S, H]
                last = mask.sum(dim=1) - 1  # [B]: right padding, so the last real token
                h = hidden[torch.arange(len(group), device=self.device), last]  # [B, H]
                values = self.value_head(h).float().mean(dim=-1)  # [B, k] -> [B]
            else:
                values = self.model(input_ids=ids, attention_mask=mask).logits.float()[:, 0]  # [B]
            for row, g in enumerate(group):
                out[g] = float(values[row])
        return out

    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        """One reward per (prompt, response); prompts are raw user queries or conversations."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])
