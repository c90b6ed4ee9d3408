"""The official ``openai`` client, unchanged, against the real server."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.server.support import MODEL_NAME, ServerProcess


@pytest.fixture
def oai(live_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.api_key, max_retries=0)


def test_models_list(oai: OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [MODEL_NAME]


def test_completion(oai: OpenAI) -> None:
    c = oai.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0)
    assert c.object == "text_completion"
    assert c.choices[0].finish_reason in {"stop", "length"}
    assert isinstance(c.choices[0].text, str)
    assert c.usage is not None and c.usage.completion_tokens <= 5


def test_chat_completion(oai: OpenAI) -> None:
    c = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello!"},
        ],
        max_tokens=6,
        temperature=0.5,
        top_p=0.9,
        stop=["\n\n"],
        n=1,
    )
    assert c.object == "chat.completion"
    assert c.choices[0].message.role == "assistant"
    assert isinstance(c.choices[0].message.content, str)
    assert c.usage is not None
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_streamed_chat_completion(oai: OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert finish in {"stop", "length"}
    assert usage is not None and 1 <= usage.completion_tokens <= 12
    assert "".join(pieces)


def test_errors_surface_as_openai_exceptions(oai: OpenAI, live_server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL_NAME, prompt="x", max_tokens=100_000)
    anonymous = OpenAI(base_url=live_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
