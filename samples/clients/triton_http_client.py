"""Call the Triton `apar` model through Triton's HTTP generate extension (standard library only).

    runtime/launch_tritonserver.sh --model samples/models/apar-tiny &
    python samples/clients/triton_http_client.py --url http://127.0.0.1:8000 "Give me 3 tips."
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request


def post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="Give me 3 tips for better sleep.")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    if "://" not in args.url:          # host:port, as the gRPC client takes it
        args.url = "http://" + args.url
    args.url = args.url.rstrip("/")
    body = {"text_input": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.0}

    # one response: POST /v2/models/apar/generate
    with post(f"{args.url}/v2/models/apar/generate", body) as r:
        print("== generate:", json.load(r)["text_output"])

    # Server-Sent Events: POST /v2/models/apar/generate_stream with "stream": true
    print("== generate_stream: ", end="", flush=True)
    with post(f"{args.url}/v2/models/apar/generate_stream", {**body, "stream": True}) as r:
        for line in r:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise SystemExit(f"\nerror: {event['error']}")
                print(event["text_output"], end="", flush=True)
    print()

    # a bad request fails alone, with Triton's error body
    try:
        post(f"{args.url}/v2/models/apar/generate", {"text_input": "x", "temperature": -1.0})
    except urllib.error.HTTPError as e:
        print("== bad request:", e.code, json.load(e))


if __name__ == "__main__":
    main()
