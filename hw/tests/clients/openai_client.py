"""The official `openai` Python client against a disaggregated cluster (`disagg-hw serve`).

Usage: python openai_client.py PATH/TO/disagg-hw

Starts one prefill and one decode worker behind the frontend on free loopback ports, then lists
the models, streams a chat completion and a completion, and checks them against the same
requests made without streaming. Exits non-zero on any mismatch.
"""

import os
import subprocess
import sys
import tempfile

import openai

CLUSTER = """
[model]
id = "smollm2-135m"

[frontend]
addr = "127.0.0.1:0"
registry_addr = "127.0.0.1:0"

[[worker]]
name = "prefill-0"
role = "prefill"

[[worker]]
name = "decode-0"
role = "decode"
"""


def main() -> None:
    binary = sys.argv[1]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(CLUSTER)
        config = f.name
    server = subprocess.Popen(
        [binary, "serve", "--config", config], stdout=subprocess.PIPE, text=True
    )
    try:
        ready = server.stdout.readline().strip()
        assert ready.startswith("ready "), f"serve did not start: {ready!r}"
        url = ready.removeprefix("ready ")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        check(client)
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config)


def check(client: openai.OpenAI) -> None:
    models = [m.id for m in client.models.list()]
    assert models == ["smollm2-135m"], models
    print("models:", models)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(
        model="smollm2-135m", messages=messages, temperature=0, max_tokens=24
    )
    answer = whole.choices[0].message.content
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
    ):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    print("chat:", repr(answer), "| streamed:", repr(streamed), "| finish:", finish)
    assert "Paris" in answer, answer
    assert streamed == answer, (streamed, answer)
    assert finish == "stop", finish
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0

    prompt = "The three primary colours are"
    text = client.completions.create(
        model="smollm2-135m", prompt=prompt, temperature=0, max_tokens=12
    ).choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2-135m",
            prompt=prompt,
            temperature=0,
            max_tokens=12,
            stream=True,
        )
        if c.choices
    )
    print("completion:", repr(text), "| streamed:", repr(streamed))
    assert text and streamed == text, (streamed, text)

    try:
        client.chat.completions.create(model="nope", messages=messages)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        print("unknown model:", e.status_code)
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
