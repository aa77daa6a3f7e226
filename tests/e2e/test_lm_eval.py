"""lm-evaluation-harness against the gateway's OpenAI-compatible HTTP API, for real: a
redis-server, a decoder process serving the embedded SmolLM2-135M and a gateway with its HTTP
listener, all on loopback, and lm-eval's own command line run as the README shows ("Scoring a skip
profile with lm-evaluation-harness"): model `local-completions` on the two small offline tasks of
tests/data/lm_eval/ - multiple choice by log-likelihood (token-id prompts with `echo` and
`logprobs`) and short answers by greedy generation (`generate_until`, exact match).

It runs twice: dense (the `ffnskip` extension object through lm-eval's `--gen_kwargs`) and under
the served skip profile (no override). The dense run's per-item results must equal an
in-process evaluation of the very token ids lm-eval sent (its own tokenizer code encodes them
here again): ffnskip.evaluation.loglikelihood for the log-likelihoods and is-greedy flags, the
engine's greedy decoding for the answers, and so must its scores. Everything is offline: the
tasks read local JSONL files, the tokenizer is the prepared model's directory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from ffnskip.config import SamplingParams
from ffnskip.engine import Engine, load_model
from ffnskip.engine.layers import dequantised
from ffnskip.evaluation.loglikelihood import score
from ffnskip.settings import cache_root
from ffnskip.stack.procs import free_port
from ffnskip.store.connection import RedisSettings, connect
from ffnskip.store.profiles import ProfileStore
from ffnskip.v1 import decoder_pb2, decoder_pb2_grpc
from tests.helpers.fleet import API_KEY, Fleet, wait_for
from tests.helpers.profiles import build_profile
from tests.redis_server import running_redis

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m"
TASK_DIR = "tests/data/lm_eval"  # relative: the tasks' data_files are, to the repository root lm-eval runs in
MC, GEN = "ffnskip_factoid_mc", "ffnskip_factoid_gen"
DENSE = {"ffnskip": {"policy": "dense"}}
# log P of a continuation (a sum of 1-6 token log-probabilities), lm-eval's number against the
# in-process one: both are fp32 forwards of the same weights on the same ids, but the decoder's
# prefill (the engine's layers, batched, chunked) and one plain transformers forward sum in
# different orders; log-probabilities then differ by ~1e-6 to 1e-5 per token (logits of
# magnitude ~10-30 at fp32's 6e-8 relative precision, through 30 layers). 1e-3 is two orders
# above that and still far below any gap that decides an item: the test checks each item's gap.
TOLERANCE = 1e-3
SKIPPED = f'ffnskip:ffn_blocks_skipped_total{{model_name="{MODEL}"}}'


@dataclass
class Run:
    scores: dict  # task -> lm-eval's results entry ("acc,none", "exact_match,none", ...)
    samples: dict  # task -> the logged samples, in doc order
    skipped_blocks: float  # FFN blocks the decoder skipped during the run
    seconds: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("lm_eval")
    with running_redis() as redis_server:
        fleet = Fleet(tmp, redis_server.url, Path(MODEL))  # the embedded model by name
        http_port, metrics_port = free_port(), free_port()
        try:
            decoder = fleet.decoder("d1", FFNSKIP_MODEL_NAME=MODEL, FFNSKIP_METRICS_HOST="127.0.0.1",
                                    FFNSKIP_METRICS_PORT=str(metrics_port), FFNSKIP_WEIGHTS="int8")
            gateway = fleet.gateway("gw-a", FFNSKIP_HTTP_HOST="127.0.0.1", FFNSKIP_HTTP_PORT=str(http_port))
            decoder.wait_serving(180.0)
            gateway.wait_serving(60.0)
            gateway.wait_serving(30.0, service=f"model:{MODEL}")  # it has found the decoder
            version = publish_profile(redis_server.url, decoder.address)
            wait_for(lambda: decoder_info(decoder.address).profile_version == version, 30, "the skip profile")
            yield {"tmp": tmp, "url": f"http://127.0.0.1:{http_port}/v1/completions",
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "fleet": fleet}
        finally:
            fleet.stop()


def decoder_info(address: str) -> decoder_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return decoder_pb2_grpc.DecoderStub(channel).Info(decoder_pb2.InfoRequest(), timeout=10)


def publish_profile(redis_url: str, decoder_address: str) -> int:
    """An adaptive profile for the served model that skips within the answers' few tokens:
    warm-up 1, threshold 0.9 (SmolLM2's middle layers reach it), up to 4 FFNs per decision."""
    profile = build_profile(model_id=MODEL, fingerprint=decoder_info(decoder_address).fingerprint, num_layers=30,
                            cold_start=1, cold_end=29, threshold=0.9, max_skip=4, warm_up=1)
    return ProfileStore(connect(RedisSettings(url=redis_url))).publish(profile, activate=True)


def model_args(url: str) -> dict:
    """The README's model arguments: token-id requests encoded with the prepared model's own
    tokenizer directory (no hub), one prompt per request (the API serves one), no retries."""
    return {"model": MODEL, "base_url": url, "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer_dir()),
            "max_retries": 1, "timeout": 120}


def tokenizer_dir() -> Path:
    return cache_root(os.environ) / "models" / MODEL  # where `ffnskip prepare` puts it


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_lm_eval(stack: dict, name: str, gen_kwargs: dict | None) -> Run:
    out = stack["tmp"] / name
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
               "--model_args", json.dumps(model_args(stack["url"])), "--include_path", TASK_DIR,
               "--tasks", MC, GEN, "--output_path", str(out), "--log_samples"]
    if gen_kwargs:
        command += ["--gen_kwargs", json.dumps(gen_kwargs)]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(stack["tmp"] / "datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    before = metric(stack["metrics"], SKIPPED)
    started = time.monotonic()
    log = out.with_suffix(".log")  # lm-eval's own output, its timestamps included
    with open(log, "w") as sink:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=300).returncode
    seconds = time.monotonic() - started
    assert code == 0, f"lm-eval failed ({code}); {log}:\n{log.read_text()[-6000:]}"
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    samples = {}
    for task in (MC, GEN):
        (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda row: row["doc_id"])
    return Run(json.loads(Path(results).read_text())["results"], samples, metric(stack["metrics"], SKIPPED) - before,
               seconds)


@pytest.fixture(scope="module")
def runs(stack) -> dict[str, Run]:
    return {"dense": run_lm_eval(stack, "dense", DENSE), "profile": run_lm_eval(stack, "profile", None)}


@pytest.fixture(scope="module")
def encoder():
    """lm-eval's own local-completions model object, only for its tokenization of the requests
    (`_encode_pair`, `tok_encode`): the ids it sent, encoded again; it calls nothing."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(**model_args("http://127.0.0.1:1/v1/completions"))


@pytest.fixture(scope="module")
def smollm():
    """The model the decoder serves: its int8 matrices as float32 (layers.dequantised); new
    tensors, so the LM head no longer shares the embedding's, which the engine keeps float32."""
    loaded = load_model(MODEL, device="cpu", dtype="float32", cache_dir=cache_root(os.environ))
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(dequantised(module.weight), requires_grad=False)
    return loaded


def arguments(sample: dict) -> list[tuple]:
    """A logged sample's requests' arguments, in request order."""
    args = sample["arguments"]
    return [tuple(args[f"gen_args_{i}"][f"arg_{j}"] for j in range(len(args[f"gen_args_{i}"])))
            for i in range(len(args))]


def exact_match(answer: str, target: str) -> bool:
    """The gen task's metric as its yaml configures lm-eval's exact_match: leading and trailing
    whitespace, case and punctuation aside."""
    def norm(text: str) -> str:
        text = re.sub(r"\s+$", "", re.sub(r"^\s+", "", text)).lower()
        return text.translate(str.maketrans("", "", string.punctuation))
    return norm(answer) == norm(target)


def test_dense_multiple_choice_equals_the_in_process_reference(runs, encoder, smollm):
    samples = runs["dense"].samples[MC]
    assert len(samples) == 10
    correct = 0
    for sample in samples:
        pairs = arguments(sample)  # (context, " " + choice) per choice
        assert len(pairs) == len(sample["doc"]["choices"]) == 4
        served = [(float(logprob), is_greedy == "True") for ((logprob, is_greedy),) in sample["resps"]]
        reference = [score(smollm.model, *encoder._encode_pair(context, continuation)) for context, continuation in pairs]
        for (logprob, is_greedy), ref, (_, continuation) in zip(served, reference, pairs):
            where = f"{sample['doc']['id']} {continuation!r}"
            assert logprob == pytest.approx(ref.logprob, abs=TOLERANCE), where
            assert ref.greedy_margin > TOLERANCE, f"{where}: a near tie, the item cannot decide is_greedy"
            assert is_greedy == ref.is_greedy, where
        ranked = sorted((ref.logprob, i) for i, ref in enumerate(reference))
        assert ranked[-1][0] - ranked[-2][0] > 2 * TOLERANCE, f"{sample['doc']['id']}: two choices tie"
        chosen = ranked[-1][1]
        assert max(range(4), key=lambda i: served[i][0]) == chosen
        assert sample["acc"] == float(chosen == sample["doc"]["label"])
        correct += chosen == sample["doc"]["label"]
    assert runs["dense"].scores[MC]["acc,none"] == pytest.approx(correct / len(samples))


def test_dense_answers_equal_the_engines_greedy_answers(runs, encoder, smollm):
    samples = runs["dense"].samples[GEN]
    assert len(samples) == 10
    engine = Engine(smollm, max_batch=1, max_seq_len=256)
    matches = 0
    for sample in samples:
        ((context, gen_kwargs),) = arguments(sample)
        assert gen_kwargs["ffnskip"] == DENSE["ffnskip"]
        # what lm-eval sent: the context's ids, max_tokens = max_gen_toks, stop = until + the EOS text
        ids = encoder.tok_encode(context)
        stop = (*gen_kwargs["until"], encoder.eos_string)
        seq = engine.add(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=gen_kwargs["max_gen_toks"], stop=stop))
        while not seq.finished:
            engine.step()
        expected = engine.result(seq).text
        ((answer,),) = sample["resps"]
        assert answer == expected, sample["doc"]["id"]
        match = exact_match(expected, sample["doc"]["answer"])
        assert sample["exact_match"] == float(match), sample["doc"]["id"]
        matches += match
    assert runs["dense"].scores[GEN]["exact_match,none"] == pytest.approx(matches / len(samples))


def test_an_echo_request_shaped_as_lm_eval_sends_it_ending_at_eos(stack, smollm):
    """The contract lm-eval's loglikelihood parsing relies on, where it is easiest to break: the
    answer is the prompt's entries then exactly one generated token's, even when that token is
    the end of sequence (lm-eval drops the last entry: `token_logprobs[ctxlen:-1]`)."""
    tokenizer = smollm.tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Reply with one word: is water wet?"}],
                                             add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(rendered + "Yes.", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = smollm.model(torch.tensor([prompt])).logits[0]
    assert int(logits[-1].argmax()) == tokenizer.eos_token_id  # greedy: the answer ends here
    body = {"model": MODEL, "prompt": [prompt], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # lm-eval's loglikelihood request, verbatim (LocalCompletionsAPI._create_payload)
    request = urllib.request.Request(stack["url"], data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        (choice,) = json.loads(reply.read())["choices"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) \
        == len(logprobs["text_offset"]) == len(prompt) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][-1] == tokenizer.eos_token and choice["finish_reason"] == "stop"
    reference = torch.log_softmax(logits.float(), dim=-1)
    expected = [float(reference[i - 1, token]) for i, token in enumerate(prompt) if i] + \
        [float(reference[-1, tokenizer.eos_token_id])]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=TOLERANCE)
    for token_logprob, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= token_logprob  # lm-eval's is-greedy: equal when greedy


def test_the_served_profile_is_scored_beside_dense(runs):
    dense, profile = runs["dense"], runs["profile"]
    print(f"\ndense: {dense.scores[MC]['acc,none']:.2f} acc, {dense.scores[GEN]['exact_match,none']:.2f} exact match "
          f"({dense.seconds:.0f} s); profile: {profile.scores[MC]['acc,none']:.2f} acc, "
          f"{profile.scores[GEN]['exact_match,none']:.2f} exact match, {profile.skipped_blocks:.0f} FFN blocks skipped "
          f"({profile.seconds:.0f} s)")
    assert dense.skipped_blocks == 0  # the override reached the decoder: nothing skipped
    assert profile.skipped_blocks > 0  # the profile served the answers
    assert all("ffnskip" not in arguments(s)[0][1] for s in profile.samples[GEN])
    # log-likelihoods come from the prompt's prefill, which runs every FFN under any policy:
    # multiple choice cannot tell a skip profile from dense (docs in the README); answers can
    assert [s["resps"] for s in profile.samples[MC]] == [s["resps"] for s in dense.samples[MC]]
    assert profile.scores[MC]["acc,none"] == dense.scores[MC]["acc,none"]
    assert 0.0 <= profile.scores[GEN]["exact_match,none"] <= 1.0
