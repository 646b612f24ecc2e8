"""Stream from the Triton `apar` model over gRPC with tritonclient (decoupled streaming).

    runtime/launch_tritonserver.sh --model samples/models/apar-tiny &
    python samples/clients/triton_grpc_client.py --url 127.0.0.1:8001 "Give me 3 tips for better sleep."
"""

from __future__ import annotations

import argparse
import queue

import numpy as np
import tritonclient.grpc as grpcclient


def tensor(name: str, value, dtype, triton_type: str) -> grpcclient.InferInput:
    arr = np.array([value], dtype=dtype)
    t = grpcclient.InferInput(name, list(arr.shape), triton_type)
    t.set_data_from_numpy(arr)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="Give me 3 tips for better sleep.")
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mode", choices=["apar", "ar"], default="apar")
    args = ap.parse_args()

    inputs = [tensor("text_input", args.prompt.encode(), np.object_, "BYTES"),
              tensor("max_tokens", args.max_tokens, np.int32, "INT32"),
              tensor("stream", True, np.bool_, "BOOL"),
              tensor("temperature", 0.0, np.float32, "FP32"),
              tensor("mode", args.mode.encode(), np.object_, "BYTES")]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))  # names must be these
    client.async_stream_infer("apar", inputs, request_id="1", enable_empty_final_response=True)
    while True:
        result, error = results.get(timeout=120)
        if error is not None:
            raise SystemExit(f"error: {error}")
        out = result.as_numpy("text_output")
        if out is not None:
            print(b"".join(out).decode(), end="", flush=True)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    print()
    client.stop_stream()
    client.close()


if __name__ == "__main__":
    main()
