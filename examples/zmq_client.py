"""Serve a model over ZeroMQ in a background thread and query it: one streamed and one whole request,
with the blocking Client and with the asyncio AsyncClient.

    python examples/zmq_client.py                 # the bundled SmolLM2-135M-Instruct
    python examples/zmq_client.py --model FOLDER  # a Hugging Face model folder

As a separate process instead: `rapid serve [--model FOLDER]` prints its address; pass it to Client(address).
"""

import argparse
import asyncio

from rapid import LLM, SamplingParams
from rapid.client import AsyncClient, Client
from rapid.server import RapidServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--mode", default="hybrid", choices=["hybrid", "rapid"])
    parser.add_argument("--address", default=None, help="default: ipc:// in a private temporary directory")
    args = parser.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=48)
    with LLM(args.model, mode=args.mode) as llm, RapidServer(llm, args.address) as server:
        server.start()  # the loop owns the LLM from here on
        print(f"serving at {server.address}\n")
        with Client(server.address, timeout_s=120) as client:
            print("--- streamed:")
            for delta in client.stream("The capital of France is", params):
                print(delta.new_text, end="", flush=True)
            print(f"\n[finish_reason={delta.finish_reason}]\n")

            chat = client.chat([{"role": "user", "content": "Name three primary colours."}], params)
            print(f"--- chat, whole:\n{chat.text}\n[{len(chat.token_ids)} tokens, {chat.finish_reason}, "
                  f"TTFT {1000 * (chat.first_token_time - chat.arrival_time):.1f} ms]\n")

        async def concurrent():
            async with AsyncClient(server.address, timeout_s=120) as client:
                prompts = ("Once upon a time", "def add(a, b):")
                return await asyncio.gather(*(client.generate(p, params) for p in prompts))

        for out in asyncio.run(concurrent()):
            print(f"--- asyncio, {out.prompt!r}:\n{out.text}\n")


if __name__ == "__main__":
    main()
