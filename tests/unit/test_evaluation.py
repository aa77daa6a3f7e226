"""`ffnskip eval`: scoring, statistics, data validation, resumability, determinism and the
report, on the tiny random Llama (seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffnskip.cli import main
from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.errors import InvalidArgument
from ffnskip.evaluation.data import load_qa_items
from ffnskip.evaluation.layerdrop import block_influence, layers_to_drop, pruned_model
from ffnskip.evaluation.methods import parse_methods, parse_targets, window_candidates
from ffnskip.evaluation.scoring import is_correct, mcnemar_exact, paired_counts, pooled_ratios, wilson_interval
from ffnskip.evaluation.state import StateFile

QUESTIONS = [{"id": f"q{i}", "question": f"What is thing number {i}?", "answers": ["zzz-never"]} for i in range(5)]
CALIBRATION = [{"id": f"c{i}", "text": f"A short passage number {i} about rivers, hills and towns."} for i in range(6)]
METHODS = "dense,random,adaptive,layer_drop@0.3"  # @: a method at its own targets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    return {"root": root, "qa": write_jsonl(root / "qa.jsonl", QUESTIONS), "cal": write_jsonl(root / "cal.jsonl", CALIBRATION)}


def eval_qa(tiny_dir: Path, files: dict, out: Path, *extra: str, data: Path | None = None, seed: int = 0) -> list[str]:
    return ["eval", "qa", "--model", str(tiny_dir), "--device", "cpu", "--data", str(data or files["qa"]),
            "--calibration-data", str(files["cal"]), "--calibration-prompts", "6", "--calibration-tokens", "8",
            "--max-new-tokens", "6", "--warm-up", "1", "--batch-size", "2", "--aligned-batch", "2",
            "--methods", METHODS, "--targets", "0.3", "--seed", str(seed), "--out", str(out), "--no-progress", "--json", *extra]


def run_json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def first_run(tiny_dir, files) -> tuple[dict, Path]:
    """One full run shared by the tests below (module scope: capsys is per test, so capture by hand)."""
    import contextlib
    import io

    out = files["root"] / "state.jsonl"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(eval_qa(tiny_dir, files, out)) == 0
    return json.loads(buffer.getvalue()), out


# -- scoring and statistics ----------------------------------------------------------------------

def test_alias_match_is_a_case_insensitive_substring():
    assert is_correct("The capital of France is PARIS.", ["paris"])
    assert is_correct("It was Neil Armstrong", ["armstrong", "neil armstrong"])
    assert not is_correct("The capital is Lyon.", ["paris"])
    assert is_correct("In 1969.", ["1969"])


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_counts_and_exact_mcnemar():
    dense = [True, True, True, False, False, True]
    other = [True, False, True, True, False, False]
    counts = paired_counts(dense, other)
    assert (counts["both"], counts["dense_only"], counts["method_only"], counts["neither"]) == (2, 2, 1, 1)
    assert counts["mcnemar_p"] == pytest.approx(1.0)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0


def test_pooled_ratios_count_blocks_over_layers_times_tokens():
    records = [{"generated": 10, "skipped": 6, "decode_tokens": 8, "decode_skipped": 6},
               {"generated": 4, "skipped": 0, "decode_tokens": 2, "decode_skipped": 0}]
    skip, decode = pooled_ratios(records, num_layers=3)
    assert skip == pytest.approx(6 / 42) and decode == pytest.approx(6 / 30)


# -- methods, data, state --------------------------------------------------------------------------

def test_methods_and_targets_are_validated():
    assert parse_methods("adaptive,random") == ["dense", "adaptive", "random"]
    assert parse_methods("aligned_q75,dense") == ["dense", "aligned_q75"]
    assert parse_methods("adaptive,aligned@0.15/0.25") == ["dense", "adaptive", "aligned@0.15/0.25"]
    with pytest.raises(InvalidArgument, match="targets"):
        parse_methods("aligned@0.15/2")
    with pytest.raises(InvalidArgument, match="methods"):
        parse_methods("adaptive,magic")
    assert parse_targets("0.35,0.05") == [0.05, 0.35]
    with pytest.raises(InvalidArgument, match="targets"):
        parse_targets("0.95")


def test_window_chooses_the_most_redundant_layers():
    means = [0.2, 0.90, 0.91, 0.99, 0.98, 0.97, 0.92, 0.3]
    # a fire at the window's first layer skips the rest of it: those layers should be the most similar
    assert window_candidates(means, 0.25, 8, 1, 7, fire_rates=(1.0,)) == [(2, 5)]


def test_qa_items_need_questions_and_aliases(tmp_path):
    assert [i.answers for i in load_qa_items(str(write_jsonl(tmp_path / "ok.jsonl", QUESTIONS[:2])))] == [("zzz-never",)] * 2
    with pytest.raises(InvalidArgument, match="answers"):
        load_qa_items(str(write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "question": "Q?", "answers": []}])))


def test_state_file_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "state.jsonl"
    state = StateFile(path)
    state.put("k1", "d1", {"x": 1})
    with open(path, "a") as handle:
        handle.write('{"key": "k2", "dig')  # killed mid-write
    reread = StateFile(path)
    assert reread.get("k1", "d1") == {"x": 1} and reread.get("k2", "d1") is None and reread.get("k1", "other") is None
    reread.put("k3", "d3", [1])
    assert StateFile(path).get("k3", "d3") == [1]


# -- layer dropping ------------------------------------------------------------------------------

def test_layer_drop_removes_layers_in_a_copy(tiny_loaded):
    ids = tiny_loaded.tokenizer("hello there")["input_ids"]
    importance = block_influence(tiny_loaded, [ids])
    assert len(importance) == tiny_loaded.num_layers and all(v >= 0 for v in importance)
    drop = layers_to_drop(importance, 2)
    assert len(drop) == 2 and all(importance[d] <= min(importance[i] for i in range(6) if i not in drop) for d in drop)
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True)
    before = Engine(tiny_loaded, max_batch=1, max_seq_len=64).generate(["hello"], sampling)[0].token_ids
    pruned = pruned_model(tiny_loaded, drop)
    assert pruned.num_layers == 4 and len(pruned.model.model.layers) == 4
    assert Engine(pruned, max_batch=1, max_seq_len=64).generate(["hello"], sampling)[0].skip_stats.num_layers == 4
    assert tiny_loaded.num_layers == 6 and len(tiny_loaded.model.model.layers) == 6  # the original is untouched
    assert Engine(tiny_loaded, max_batch=1, max_seq_len=64).generate(["hello"], sampling)[0].token_ids == before


# -- the command ---------------------------------------------------------------------------------

def test_qa_json_has_a_row_per_method_and_ratio(first_run):
    report, _ = first_run
    rows = {(r["method"], r["target_skip"]): r for r in report["rows"]}
    assert set(rows) == {("dense", 0.0), ("random", 0.3), ("adaptive", 0.3), ("layer_drop", 0.3)}
    for row in rows.values():
        assert {"method", "target_skip", "decode_skip_ratio", "accuracy", "ci95", "n", "agreement"} <= set(row)
        assert row["n"] == len(QUESTIONS) and row["accuracy"] == 0.0  # no answer says zzz-never
    assert rows[("dense", 0.0)]["agreement"] == 1.0 and rows[("dense", 0.0)]["decode_skip_ratio"] == 0.0
    assert rows[("adaptive", 0.3)]["decode_skip_ratio"] > 0.0 and rows[("random", 0.3)]["decode_skip_ratio"] > 0.0
    assert rows[("layer_drop", 0.3)]["decode_skip_ratio"] == pytest.approx(2 / 6, abs=1e-3)  # round(0.3 * 6) layers
    assert report["calibration"]["cold_start"] >= 1 and len(report["calibration"]["layers"]) == 6


def test_second_run_with_the_same_state_does_no_work(first_run, tiny_dir, files, capsys, monkeypatch):
    report, out = first_run
    before = out.read_bytes()

    def no_work(self):  # type: ignore[no-untyped-def]
        raise AssertionError("a finished run must be answered from the state file")

    monkeypatch.setattr(Engine, "step", no_work)
    assert run_json(eval_qa(tiny_dir, files, out), capsys) == report
    assert out.read_bytes() == before


def test_deterministic_under_a_seed(first_run, tiny_dir, files, capsys, tmp_path):
    report, _ = first_run
    again = run_json(eval_qa(tiny_dir, files, tmp_path / "fresh.jsonl"), capsys)
    strip = lambda r: {k: v for k, v in r.items() if k != "argv"}  # noqa: E731 - argv names the state file
    assert strip(again) == strip(report)
    other_seed = run_json(eval_qa(tiny_dir, files, tmp_path / "seed7.jsonl", seed=7), capsys)
    random_rows = lambda r: [x for x in r["rows"] if x["method"] == "random"]  # noqa: E731
    assert random_rows(other_seed) != random_rows(report)
    assert [x for x in other_seed["rows"] if x["method"] == "adaptive"] == [x for x in report["rows"] if x["method"] == "adaptive"]


def test_custom_data_file_scores_aliases_from_the_cache(first_run, tiny_dir, files, capsys, tmp_path):
    report, out = first_run
    state = StateFile(out)
    dense = {key.rsplit("|", 1)[1]: record["value"]["text"] for key, record in state.entries.items() if key.startswith("qa|dense@")}
    # same questions (so the cached answers are reused), aliases taken from dense's answers, ASCII upper-cased
    upper = lambda text: "".join(c.upper() if c.isascii() else c for c in text)  # noqa: E731
    rows = [dict(q, answers=[upper(dense[q["id"]].strip()[:3])]) for q in QUESTIONS[:3]]
    assert all(row["answers"][0] for row in rows)
    custom = write_jsonl(tmp_path / "custom.jsonl", rows)
    result = run_json(eval_qa(tiny_dir, files, out, data=custom), capsys)
    assert result["n_items"] == 3 and result["data"] == str(custom)
    by_method = {r["method"]: r for r in result["rows"]}
    assert by_method["dense"]["accuracy"] == 1.0 and by_method["dense"]["correct"] == 3
    assert by_method["dense"]["ci95"][1] == 1.0


@pytest.mark.parametrize("content, message", [
    (None, "no data set named"),
    ("{not json\n", "line 1 is not JSON"),
    ('{"id": "a", "question": "Q?"}\n', "'answers' must be"),
    ('{"id": "a", "question": "Q?", "answers": ["x"]}\n{"id": "a", "question": "R?", "answers": ["y"]}\n', "duplicate id"),
    ("", "has no rows"),
])
def test_bad_data_file_is_one_error_line_and_exit_2(tmp_path, tiny_dir, files, capsys, content, message):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(eval_qa(tiny_dir, files, tmp_path / "s.jsonl", data=data)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data:") and message in err[0]
    assert not (tmp_path / "s.jsonl").exists()


def test_plan_generates_nothing(tiny_dir, files, capsys, tmp_path):
    out = tmp_path / "plan.jsonl"
    assert main(eval_qa(tiny_dir, files, out, "--plan")) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "estimate: at most" in captured.err and not out.exists()


def test_report_writes_results_and_plots(first_run, tiny_dir, files, capsys, tmp_path):
    report, out = first_run
    qa_json = tmp_path / "qa.json"
    qa_json.write_text(json.dumps(report))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Say something about {i}."} for i in range(3)])
    common = ["--model", str(tiny_dir), "--device", "cpu", "--calibration-data", str(files["cal"]), "--calibration-prompts", "6",
              "--calibration-tokens", "8", "--warm-up", "1", "--batch-size", "2", "--aligned-batch", "2", "--out", str(out),
              "--no-progress", "--json", "--data", str(prompts), "--max-new-tokens", "6"]
    agreement = run_json(["eval", "agreement", *common, "--methods", METHODS, "--targets", "0.3"], capsys)
    assert {r["method"] for r in agreement["rows"]} == {"dense", "random", "adaptive", "layer_drop"}
    warmup = run_json(["eval", "warmup", *common, "--target", "0.3", "--warm-ups", "0,1", "--qa-data", str(files["qa"]),
                       "--qa-max-new-tokens", "6"], capsys)
    assert [r["warm_up"] for r in warmup["rows"]] == [None, 0, 1] and "qa_accuracy" in warmup["rows"][1]
    paths = {}
    for name, data in (("agreement", agreement), ("warmup", warmup)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    docs = tmp_path / "docs"
    assert main(["eval", "report", "--qa", str(qa_json), "--agreement", str(paths["agreement"]), "--warmup", str(paths["warmup"]),
                 "--out", str(docs / "RESULTS.md"), "--plots", str(docs / "plots")]) == 0
    text = (docs / "RESULTS.md").read_text()
    for section in ("## Headline", "## Machine", "## Factoid QA accuracy", "## Warm-up ablation", "## Comparison with the paper",
                    "## Where a 135M model differs", "## Exact commands", "## Closing note"):
        assert section in text
    assert "nan" not in text.lower().replace("nanos", "")
    for plot in ("accuracy_vs_skip", "agreement_vs_skip", "warmup", "layer_similarity"):
        assert (docs / "plots" / f"{plot}.png").read_bytes().startswith(b"\x89PNG")


def test_skip_params_of_every_method_are_valid(first_run):
    report, _ = first_run
    for row in report["rows"]:
        if row["method"] != "layer_drop":
            SkipParams(**{**row["params"], "static_layers": tuple(row["params"]["static_layers"])})


# -- batching: the bench runs exactly the evaluated settings; `eval batching` pairs them ----------

def test_bench_runs_the_evaluated_settings_and_batching_pairs_them(first_run, tiny_dir, tmp_path, capsys):
    report, _ = first_run
    qa_json = tmp_path / "qa.json"
    qa_json.write_text(json.dumps(report))
    bench = run_json(["bench", "--model", str(tiny_dir), "--device", "cpu", "--batches", "1,2", "--new-tokens", "6",
                      "--reps", "1", "--from-eval", str(qa_json), "--policies", "dense,random@0.30,adaptive@0.30",
                      "--no-compile", "--no-peer", "--json"], capsys)
    rows = {(r["policy"], r["batch"]): r for r in bench["rows"]}
    assert set(rows) == {(p, b) for p in ("dense", "random@0.30", "adaptive@0.30") for b in (1, 2)}
    evaluated = {f"{r['method']}@{r['target_skip']:.2f}": r["params"] for r in report["rows"]}
    assert rows[("adaptive@0.30", 2)]["params"] == evaluated["adaptive@0.30"]
    assert rows[("random@0.30", 1)]["params"] == evaluated["random@0.30"]

    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps(bench))
    assert main(["eval", "batching", "--bench", str(bench_json), "--qa", str(qa_json), "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "| adaptive@0.30 | 2 |" in text and "| random@0.30 | 1 |" in text
    assert (tmp_path / "plots" / "batching_tradeoff.png").read_bytes().startswith(b"\x89PNG")

    bench["rows"].append({**bench["rows"][-1], "policy": "static@0.25"})  # speed without measured quality
    bench_json.write_text(json.dumps(bench))
    assert main(["eval", "batching", "--bench", str(bench_json), "--qa", str(qa_json), "--plots", str(tmp_path / "plots")]) == 2
    assert "static@0.25" in capsys.readouterr().err


def test_bench_profile_rows_and_foreign_profiles(tiny_dir, tiny_loaded, tmp_path, capsys):
    from tests.helpers.profiles import build_profile

    profile = build_profile(model_id="tiny", fingerprint=tiny_loaded.fingerprint, num_layers=tiny_loaded.num_layers,
                            cold_start=1, cold_end=5, threshold=0.5, max_skip=2, warm_up=1)
    path = tmp_path / "profile.json"
    path.write_text(profile.to_json())
    argv = ["bench", "--model", str(tiny_dir), "--device", "cpu", "--batches", "2", "--new-tokens", "4", "--reps", "1", "--no-compile",
            "--profile", str(path), "--policies", "dense,cal_adaptive,cal_aligned_q50,cal_aligned_q75", "--json"]
    rows = {r["policy"]: r for r in run_json(argv, capsys)["rows"]}
    assert set(rows) == {"dense", "cal_adaptive", "cal_aligned_q50", "cal_aligned_q75"}
    assert rows["cal_aligned_q75"]["params"]["policy"] == "aligned" and rows["cal_aligned_q75"]["params"]["quorum"] == 0.75
    assert rows["cal_adaptive"]["params"]["threshold"] == 0.5

    path.write_text(build_profile(model_id="tiny", fingerprint="ab" * 16, num_layers=tiny_loaded.num_layers).to_json())
    assert main(argv) == 2
    assert "other weights" in capsys.readouterr().err


def test_bisect_aims_a_threshold_the_replay_cannot():
    from ffnskip.calibration.tuning import Choice, bisect_threshold

    def ratio(threshold: float) -> float:  # falls as the threshold rises, like real runs
        return max(0.0, min(1.0, (0.99 - threshold) * 10))

    runs: list[float] = []

    def run(threshold: float) -> Choice:
        runs.append(threshold)
        return Choice(threshold, None, 4, ratio(threshold), ratio(threshold), 0.5)

    tried = [run(0.9887), run(0.98)]  # 0.0113 and 0.1: both far below a 0.25 target
    bisect_threshold(run, tried, 0.25)
    assert abs(ratio(runs[-1]) - 0.25) <= 0.02 and len(runs) <= 2 + 3  # 0.96 (too many), 0.97 (too few), 0.965
