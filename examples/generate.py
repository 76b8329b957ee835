"""Generate with the offline API: the bundled SmolLM2-135M-Instruct unless --model names a folder."""

import argparse

from rapid import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--mode", default="hybrid", choices=["hybrid", "rapid"])
    args = parser.parse_args()
    with LLM(args.model, mode=args.mode) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=48)
        for out in llm.chat([[{"role": "user", "content": q}] for q in (
                "What is the capital of France?", "Name three primary colours.")], params):
            print(f"--- {out.prompt!r}\n{out.outputs[0].text}\n")
        for out in llm.generate(["The quick brown fox"], SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=24)):
            print(f"--- {out.prompt!r}\n{out.outputs[0].text}")


if __name__ == "__main__":
    main()
