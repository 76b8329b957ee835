"""Talk to `rapid serve` with the official openai package (start the server first: `rapid serve`).

    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=32, temperature=0)
    print(chat.choices[0].message.content, f"[{chat.usage.total_tokens} tokens]")
    for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=32, stream=True):
        print(chunk.choices[0].text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
