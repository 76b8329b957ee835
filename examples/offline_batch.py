"""Offline batch inference from a JSONL file (the same as `rapid batch IN OUT`).

    python examples/offline_batch.py [--model FOLDER] [--workdir DIR]

Writes a small input file (plain prompts, a chat, token ids, and one deliberately bad line), runs it, and
prints the output records (written as they finish, so not in input order). Each output line has id, text, token_ids, finish_reason and num_prompt_tokens;
a bad line gets {"id", "line", "error"} and the rest of the batch still runs.
"""

import argparse
import json
import tempfile
from pathlib import Path

from rapid import LLM
from rapid.entrypoints.batch import run_file

LINES = [
    {"id": "france", "prompt": "The capital of France is", "max_tokens": 16},
    {"id": "colours", "messages": [{"role": "user", "content": "Name three primary colours."}]},
    {"id": "sampled", "prompt": "Once upon a time", "temperature": 0.8, "sampling_params": {"seed": 1, "top_p": 0.95}},
    {"id": "ids", "prompt_token_ids": [1, 2, 3, 4], "max_tokens": 8},
    {"id": "bad", "prompt": ""},
    # the OpenAI batch format (as `vllm run_batch` reads it) can be mixed in
    {"custom_id": "openai-chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "default", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--workdir", default=None, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rapid-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "prompts.jsonl", work / "outputs.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    with LLM(args.model) as llm:
        counts = run_file(llm, str(src), str(dst), max_tokens=32, temperature=0.0)
    print(f"{counts['ok']} ok, {counts['errors']} errors -> {dst} (a re-run skips the lines already there)")
    for line in dst.read_text().splitlines():
        rec = json.loads(line)
        if "custom_id" in rec:
            body = rec["response"]["body"]
            print(f"[{rec['custom_id']}] {rec['response']['status_code']}: "
                  f"{body['choices'][0]['message']['content'] if 'choices' in body else body['error']['message']!r}")
        elif "error" in rec:
            print(f"[{rec['id']}] ERROR (line {rec['line']}): {rec['error']}")
        else:
            print(f"[{rec['id']}] {rec['text']!r} ({rec['finish_reason']}, {rec['num_prompt_tokens']} prompt tokens)")


if __name__ == "__main__":
    main()
