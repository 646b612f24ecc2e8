"""Talk to `apar-rt serve` with the official OpenAI client: plain, streamed, and with branches.

    apar-rt serve --model samples/models/apar-tiny --port 8000 &
    python samples/clients/openai_client.py --url http://127.0.0.1:8000/v1 "Give me 3 tips for better sleep."
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="Give me 3 tips for better sleep.")
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    client = OpenAI(base_url=args.url, api_key="not-needed")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]

    # 1. one answer
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                       temperature=0)
    print("== chat:", r.choices[0].message.content, f"\n   [{r.usage.completion_tokens} tokens, "
          f"finish_reason={r.choices[0].finish_reason}]")

    # 2. streamed, in final reading order: the pieces join up to exactly the same text
    print("== streamed: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # 3. the per-branch extension: each APAR branch's tokens and text as it is written
    print("== branches, as they grow:")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=0, stream=True, extra_body={"apar_branches": True})
    branches: dict[int, str] = {}
    for chunk in stream:
        for b in (chunk.model_extra or {}).get("apar", {}).get("branches", []):
            if b["id"] not in branches:
                print(f"   branch {b['id']} starts (parent {b['parent']}, at its token {b['fork_index']})")
            branches[b["id"]] = branches.get(b["id"], "") + b["text"]
    for bid, text in sorted(branches.items()):
        print(f"   branch {bid}: {text!r}")


if __name__ == "__main__":
    main()
