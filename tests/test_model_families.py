"""Models beyond SmolLM2: tiny random Llama-3, Qwen2, Qwen3 and Gemma lookalikes, each with its
family's chat template and a `generation_config` whose end ids include one the tokenizer's
`eos_token_id` is not (Llama-3's `<|eot_id|>`, Qwen's `<|endoftext|>`, Gemma's `<end_of_turn>`).
Rollouts and chat must stop at that id, and training must prompt the model as chat does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from service.auth.service import AuthSubject
from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint
from service.models import inference
from service.models import service as chat
from service.models.schemas import ChatCompletionCreate
from service.models.templates import eos_ids, render_prompt
from tests.conftest import train_local_model
from tests.support.models import tiny_config
from workers.rl.rollout import sample

LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN3 = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    config: str  # transformers config class
    template: str
    eos: str  # the tokenizer's eos_token
    pad: str
    bos: str | None
    specials: tuple[str, ...]
    turn_end: str  # listed in generation_config.eos_token_id only
    instruction: str  # how MESSAGES' developer turn must come out


FAMILIES = {
    "llama3": Family(
        "LlamaConfig",
        LLAMA3,
        "<|end_of_text|>",
        "<|end_of_text|>",
        "<|begin_of_text|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>",
    ),
    "qwen2": Family(
        "Qwen2Config",
        QWEN2,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        ("<|im_start|>",),
        "<|endoftext|>",
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user",
    ),
    "qwen3": Family(
        "Qwen3Config",
        QWEN3,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        ("<|im_start|>",),
        "<|endoftext|>",
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user",
    ),
    "gemma": Family(  # Gemma 1 and 2 refuse a system turn: the instruction leads the user's turn
        "GemmaConfig",
        GEMMA,
        "<eos>",
        "<pad>",
        "<bos>",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
        "<bos><start_of_turn>user\nAnswer briefly.\n\nSay hi<end_of_turn>",
    ),
}
LOWERCASE = """
def grade(sample, item):
    text = sample["output_text"]
    return sum(c.isascii() and c.islower() for c in text) / max(1, len(text))
"""
# OpenAI's shapes that templates do not know: the developer role and content as a list of parts.
MESSAGES: list[dict[str, Any]] = [
    {"role": "developer", "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "briefly."}]},
    {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
]


def tiny_family(family: Family) -> tuple[Any, Any]:
    """A 2-layer random model of the family's architecture and a byte-level tokenizer with its
    special tokens, template and end ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(
        models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    named = {"eos_token": family.eos, "pad_token": family.pad} | ({"bos_token": family.bos} if family.bos else {})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **named)
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.specials)})
    tokenizer.chat_template = family.template
    config = tiny_config(
        family.config,
        len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(family.turn_end)]
    return model, tokenizer


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture
def favouring_turn_end(family: Family) -> Iterator[tuple[Any, Any, int]]:
    """The family's model with its logits pushed towards the turn-end id, so it says it first."""
    model, tokenizer = tiny_family(family)
    turn_end = int(tokenizer.convert_tokens_to_ids(family.turn_end))
    assert turn_end != tokenizer.eos_token_id and turn_end in eos_ids(model, tokenizer)

    def push(_module: Any, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        return logits + 50.0 * torch.nn.functional.one_hot(torch.tensor(turn_end), logits.shape[-1])

    handle = model.get_output_embeddings().register_forward_hook(push)
    yield model, tokenizer, turn_end
    handle.remove()


@pytest.mark.parametrize("greedy", [True, False])
def test_rollouts_end_at_the_generation_configs_turn_end_id(
    favouring_turn_end: tuple[Any, Any, int], greedy: bool
) -> None:
    model, tokenizer, turn_end = favouring_turn_end
    rollout = sample(
        model,
        tokenizer,
        [MESSAGES, MESSAGES[1:]],
        2,
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        seed=5,
        greedy=greedy,
    )
    completions = rollout.input_ids[:, rollout.prompt_len :]
    assert completions.shape[1] == 1  # every row ended at once, so decoding stopped
    assert completions[:, 0].tolist() == [turn_end] * 4
    assert rollout.completion_mask.tolist() == [[1]] * 4  # the end id is kept: the model learns to stop
    assert not rollout.truncated.any()
    assert rollout.texts == [""] * 4


def test_chat_answers_end_at_the_same_id(favouring_turn_end: tuple[Any, Any, int]) -> None:
    model, tokenizer, _ = favouring_turn_end
    prompt = inference.prompt_ids(tokenizer, MESSAGES)
    (deltas,) = list(inference.stream(model, tokenizer, prompt, inference.Params(max_tokens=8, temperature=0)))
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in deltas] == [("", "stop", 1)]


def test_training_prompts_are_the_prompts_chat_gives(family: Family, settings: Settings, tmp_path: Path) -> None:
    """Chat reads the model from disk as a job would; its prompt ids must be the rollout's."""
    model, tokenizer = tiny_family(family)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    body = ChatCompletionCreate.model_validate({"model": str(tmp_path), "messages": MESSAGES, "max_tokens": 2})
    prepared = chat.prepare(nullcontext(None), AuthSubject("p", "k"), settings, body)  # type: ignore[arg-type]
    rollout = sample(model, tokenizer, [MESSAGES], 1, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0)
    prompt = rollout.input_ids[0, : rollout.prompt_len][rollout.attention_mask[0, : rollout.prompt_len].bool()]
    assert prompt.tolist() == prepared.prompt
    text = render_prompt(tokenizer, MESSAGES)
    assert text.startswith(family.instruction)
    assert "developer" not in text


def test_end_ids_are_the_tokenizers_then_the_generation_configs_each_once() -> None:
    model, tokenizer = tiny_family(FAMILIES["llama3"])
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eos_ids(model, tokenizer) == [eos, eot]
    model.generation_config.eos_token_id = [eot, eos, eot]
    assert eos_ids(model, tokenizer) == [eos, eot]
    model.generation_config.eos_token_id = None
    assert eos_ids(model, tokenizer) == [eos]


def test_a_template_that_refuses_the_messages_is_a_400() -> None:
    from service.core.errors import InvalidRequest

    _, tokenizer = tiny_family(FAMILIES["gemma"])
    with pytest.raises(InvalidRequest, match="roles must alternate") as refused:
        render_prompt(tokenizer, [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}])
    assert refused.value.status_code == 400 and refused.value.param == "messages"


def test_a_qwen_model_trains_through_the_job_api(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path
) -> None:
    model, tokenizer = tiny_family(FAMILIES["qwen2"])
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lines = [
        {"messages": [{"role": "developer", "content": "Lowercase."}, {"role": "user", "content": f"go {i}"}]}
        for i in range(4)
    ]
    grader = {"type": "python", "name": "lower", "source": LOWERCASE}
    # a random model rarely stops within 6 tokens: keep truncated completions in the loss, so the
    # update does not hang on whether this seed's samples happened to end
    hyper = {"batch_size": 4, "compute_multiplier": 2, "max_completion_tokens": 6, "eval_samples": 2, "n_epochs": 1}
    hyper["mask_truncated_completions"] = False
    job_id = train_local_model(live_client, live_auth, live_settings, folder, lines, grader, hyper)
    with unit_of_work(live_settings) as session:
        key = session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id)).first()
    assert key is not None
    trained = load_file(str(live_settings.storage_dir / key / "model.safetensors"))
    before = load_file(str(folder / "model.safetensors"))
    assert any(not torch.equal(trained[name], before[name]) for name in before)
