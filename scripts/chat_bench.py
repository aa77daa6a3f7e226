"""What the prompt caches give a chat client: the service and llama-server side by side, per-turn
TTFT of a conversation that resends itself every turn, and two users sharing a long system prompt
(ffnskip.bench.chat says how the scenes are played).

    ffnskip up   # or any gateway; FFNSKIP_API_KEYS for --api-key
    python scripts/chat_bench.py --target 127.0.0.1:50051 --api-key KEY --peer-gguf q8_0 --turns 10 \\
        --json docs/perf/chat-ttft.json
"""

from __future__ import annotations

import argparse
import json

from ffnskip.bench.chat import ChatScenes, Messages, play, system_prompt
from ffnskip.bench.json_results import write_results
from ffnskip.bench.llama_server import context_size
from ffnskip.bench.service import generation_stub, stream_once
from ffnskip.bench.service_peer import ServerPeer
from ffnskip.datasets import texts
from ffnskip.engine.prompts import encode_prompt
from ffnskip.rpc.channels import insecure_channel
from ffnskip.rpc.convert import policy_fields
from ffnskip.v1 import generation_pb2 as pb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of a gateway or decoder")
    parser.add_argument("--api-key", help="bearer key, when the target is a gateway")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--peer-gguf", default="q8_0", choices=("f32", "bf16", "q8_0"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--policy", default="", help="a skip policy for the service; default: its served profile")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    most = len(texts("prompts", "prompt")) - 2  # two questions go to the shared system prompt's users
    if not 1 <= args.turns <= most:
        parser.error(f"--turns: between 1 and {most} (the packaged questions), got {args.turns}")

    peer = ServerPeer(args.model, "float32", None, args.peer_gguf)
    scenes = ChatScenes(system_prompt(lambda text: len(peer.tokenizer.encode(text)), args.system_tokens),
                        texts("prompts", "prompt"))
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    sampling = pb.SamplingOptions(max_new_tokens=args.new_tokens, ignore_eos=True)
    skip = pb.SkipOverrides(**policy_fields(args.policy))
    longest = args.system_tokens + 100 + args.turns * (args.new_tokens + 80)  # questions and templates: under 80
    with insecure_channel(args.target) as channel, peer.server([[0] * longest], slots=2,
                                                                new_tokens=args.new_tokens) as server:
        stub = generation_stub(channel)

        def ours(messages: Messages):
            request = pb.GenerateRequest(model=args.model, sampling=sampling, skip=skip,
                                         messages=[pb.ChatMessage(**m) for m in messages])
            return stream_once(stub, request, metadata, args.timeout)

        def theirs(messages: Messages):
            return server.stream(encode_prompt(peer.tokenizer, None, messages), args.new_tokens, args.timeout,
                                 cache_prompt=True)

        report = play(scenes, ours, theirs, args.turns)
    report.update(model=args.model, peer_gguf=args.peer_gguf, new_tokens=args.new_tokens,
                  system_tokens=len(peer.tokenizer.encode(scenes.system)), context_size=context_size(2, longest, 1))
    print(json.dumps(report, indent=2))
    write_results(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
