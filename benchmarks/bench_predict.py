"""Prediction benchmark: lxmert_fast.use.predictor.Predictor against transformers' LxmertForQuestionAnswering.

The same weights (transformers' random initialisation, seed 0; the full-size VQA model with 3,129 answers, or a
tiny one in smoke mode) answer the same batch of questions about images of a feature store: one question (batch 1)
and 32. Timed is the model call that turns a prepared batch into answer logits, under inference mode, for
    lxmert_fast exact   Predictor.logits in fp32: text padded to the batch's longest question and packed away inside
                        the encoder only when the padding pays for it
    lxmert_fast fast    the same with fast=True: int8 dynamic quantisation of the linear layers on a CPU, bf16
                        autocast on a GPU
    transformers        LxmertForQuestionAnswering(**the same inputs)
The questions are 6 to 16 tokens long ([CLS] and [SEP] included), as VQA's are; batch 1 asks one of 12. A shared
CPU's speed drifts within minutes, so the implementations alternate round by round and each gets the median of its
rounds.
"""

import statistics
import time

import pytest
import torch

SUITE = "predict"
ROUNDS = {1: 15, 32: 5}
TARGET_FAST_SPEEDUP = 1.5


def make_predictors(config, store, tokenizer_dir, device):
    import transformers

    from lxmert_fast import LxmertForQuestionAnswering
    from lxmert_fast.use.predictor import Predictor

    torch.manual_seed(0)
    theirs = transformers.LxmertForQuestionAnswering(config).eval().to(device)
    ours = LxmertForQuestionAnswering(config)
    ours.load_state_dict(theirs.state_dict())
    answers = [f"answer {i}" for i in range(config.num_qa_labels)]
    exact = Predictor(ours, tokenizer_dir, answers, [store], device=device)
    fast = Predictor(ours, tokenizer_dir, answers, [store], device=device, fast=True)
    return theirs, exact, fast


def question_batch(predictor, batch_size, vocab_size, num_images, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [12] if batch_size == 1 else torch.randint(6, 17, (batch_size,), generator=g).tolist()
    ids = [[2] + torch.randint(5, vocab_size, (n - 2,), generator=g).tolist() + [3] for n in lengths]
    images = [((0, int(torch.randint(0, num_images, (), generator=g))),) for _ in range(batch_size)]
    return predictor.make_batch(ids, images)


def bench_config(full):
    """The full-size VQA model, or a tiny one in smoke mode."""
    from lxmert_fast import LxmertConfig

    if full:
        return LxmertConfig(num_qa_labels=3129)
    return LxmertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1,
                        r_layers=1, visual_feat_dim=24, num_qa_labels=10, max_position_embeddings=32)


def alternating_timings(bench, steps, rounds):
    """{impl: (median ms, timer)} of `rounds` rounds in which the implementations take turns (a shared CPU drifts)."""
    times = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            bench.sync()
            t0 = time.perf_counter()
            step()
            bench.sync()
            times[impl].append(time.perf_counter() - t0)
    return {impl: (statistics.median(t) * 1e3, f"wall-clock, median of {rounds} alternating rounds")
            for impl, t in times.items()}


def record_timings(bench, case, timings, batch_size, batch, fast_error):
    """Record each implementation's time; returns the case's records, with the targets of ours marked."""
    from lxmert_fast.use.predictor import PACK_MIN_PADDING

    fast_dtype = "int8" if bench.device.type == "cpu" else "bf16"
    for impl, (ms, timer) in timings.items():
        bench.record(SUITE, case, impl, ms, "ours" if impl.startswith("lxmert") else "baseline",
                     dtype=fast_dtype if impl.endswith("fast") else "fp32", timer=timer,
                     samples_per_s=batch_size / (ms * 1e-3),
                     params={"batch": batch_size, "threads": torch.get_num_threads(), "device": bench.device.type,
                             "padding_fraction": round(batch["padding_fraction"], 3),
                             "packed": batch["padding_fraction"] >= PACK_MIN_PADDING},
                     **({"max_logit_error": fast_error} if impl.endswith("fast") else {}))
    recs = bench.finish_case(SUITE, case)
    for r in recs:
        if r["impl"] == "lxmert_fast fast":
            r["target_speedup"] = TARGET_FAST_SPEEDUP
            r["target_met"] = r["speedup"]["transformers"] >= TARGET_FAST_SPEEDUP
        elif r["impl"] == "lxmert_fast exact":
            r["target_speedup"] = 1.0
            r["target_met"] = r["speedup"]["transformers"] >= 1.0
    return recs


@pytest.mark.parametrize("batch_size", [1, 32], ids=lambda b: f"B{b}")
def test_predict_speed(bench, benchmark, batch_size, tmp_path_factory):
    from lxmert_fast.data import FeatureStore, ensure_sample_data

    config = bench_config(bench.full)
    num_images = 32
    sample = ensure_sample_data(tmp_path_factory.getbasetemp() / f"predict_sample_{config.visual_feat_dim}",
                                num_images=num_images, feat_dim=config.visual_feat_dim)
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    theirs, exact, fast = make_predictors(config, store, sample.tokenizer_dir, bench.device)
    batch = question_batch(exact, batch_size, len(exact.tokenizer), num_images)
    inputs = {k: v for k, v in batch.items() if k != "padding_fraction"}

    def transformers_step():
        with torch.inference_mode():
            return theirs(**inputs).question_answering_score

    steps = {
        "lxmert_fast exact": lambda: exact.logits(batch),
        "lxmert_fast fast": lambda: fast.logits(batch),
        "transformers": transformers_step,
    }
    reference = transformers_step().float()
    assert torch.allclose(steps["lxmert_fast exact"](), reference, atol=1e-4, rtol=1e-4)
    fast_error = (steps["lxmert_fast fast"]() - reference).abs().max().item()
    if bench.full:
        timings = alternating_timings(bench, steps, ROUNDS[batch_size])
    else:
        timings = {impl: bench.time_ms(step) for impl, step in steps.items()}
    recs = record_timings(bench, f"VQA prediction/B{batch_size}", timings, batch_size, batch, fast_error)
    benchmark.extra_info.update({"records": recs})
    benchmark.pedantic(steps["lxmert_fast exact"], rounds=1, iterations=1)


def test_predict_results_well_formed(bench, tmp_path):
    recs = bench.records_of(SUITE, "prediction")
    back = bench.check_results(recs, tmp_path, {"transformers"})
    assert {r["impl"] for r in back["records"]} == {"lxmert_fast exact", "lxmert_fast fast", "transformers"}
    for r in back["records"]:
        assert r["samples_per_s"] > 0
