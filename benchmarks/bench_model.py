"""Model benchmarks: lxmert_fast's LXMERT against transformers' with the same weights on the same batch.

- training step (forward with all pre-training losses, backward, AdamW step; ours evaluates the LM head at the
  masked tokens only and skips text padding, also when compiled or graphed, as pretrain.py does, for the same
  loss: see ``our_extras``) and inference (eval, no labels) of ``LxmertForPreTraining``: eager at each batch
  size; fp32 on CPU, fp16 (with a GradScaler) and bf16 under autocast on a GPU; peak GPU memory of each (one
  model on the device at a time);
- the same steps without launch overhead, bf16 at one batch size on a GPU: captured in a CUDA graph
  (lxmert_fast.train.cuda_graphs.GraphedStep) and/or ``torch.compile``'d, ours and transformers' (graphed) alike;
- the CPU target (1.3x transformers' speed): ``LxmertModel`` forward + backward in training mode on padded caption
  batches (lengths 8-20 padded to 20, 36 objects), torch path vs transformers, full-size config, on the CPU in every
  run.

TFLOP/s use the model FLOPs of lxmert_fast/model/flops.py at 20 tokens and 36 objects: a training sample counts its
LM head at the masked tokens only (the work the task needs, whatever an implementation spends), an inference
sample its LM head at every token (both implementations return all logits). The text counts as 20 tokens, padding
included, as the CPU target defines the count, although ours skips most of the padding: the captions here average 14.
"""

import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lxmert_fast.data import to_device
from lxmert_fast.model.flops import count_flops, pretraining_flops_per_sample

SUITE = "model"
MODES = ("", "eager", "compiled", "graphed", "compiled+graphed")
TARGET_SUITE = "cpu_target"
CPU_TARGET_SPEEDUP = 1.3


def tiny_config():
    """A config small enough for smoke mode: every module of the base model, a few units wide."""
    from lxmert_fast import LxmertConfig

    return LxmertConfig(vocab_size=120, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                        x_layers=1, r_layers=1, visual_feat_dim=24, num_qa_labels=10, num_object_labels=16,
                        num_attr_labels=8, max_position_embeddings=32)


def model_config(bench):
    from lxmert_fast import LxmertConfig

    return LxmertConfig() if bench.full else tiny_config()


def ours_classes():
    try:
        import lxmert_fast
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"lxmert_fast is not importable: {type(exc).__name__}: {exc}")
    return lxmert_fast


def make_batch(config, batch, text_len, num_objects, device, seed=0, labels=True):
    """A pre-training batch as the data pipeline makes it: captions of 8-20 tokens padded to ``text_len``, all
    objects real, 15% of tokens and objects masked, detector labels with confidences, half the pairs mismatched."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(min(8, text_len), text_len + 1, (batch,), generator=g)
    real = torch.arange(text_len)[None, :] < lengths[:, None]
    ids = torch.randint(5, config.vocab_size, (batch, text_len), generator=g)
    ids[:, 0] = 1  # [CLS]-like
    ids[torch.arange(batch), lengths - 1] = 2  # [SEP]-like
    ids = ids.masked_fill(~real, 0)
    feats = torch.rand(batch, num_objects, config.visual_feat_dim, generator=g)
    xy = torch.rand(batch, num_objects, 2, 2, generator=g).sort(dim=2).values
    out = {
        "input_ids": ids,
        "attention_mask": real.long(),
        "token_type_ids": torch.zeros_like(ids),
        "visual_feats": feats,
        "visual_pos": xy.permute(0, 1, 3, 2).reshape(batch, num_objects, 4),  # x1, y1, x2, y2 in [0, 1]
    }
    if labels:
        masked = (torch.rand(batch, text_len, generator=g) < 0.15) & real
        masked[:, 1] |= ~masked.any(1)  # at least one label per caption
        obj_masked = torch.rand(batch, num_objects, generator=g) < 0.15
        matched = torch.randint(0, 2, (batch,), generator=g)
        ans = torch.randint(0, config.num_qa_labels, (batch,), generator=g).masked_fill(matched == 0, -100)
        out.update({
            "labels": ids.masked_fill(~masked, -100),
            "obj_labels": {
                "obj": (torch.randint(0, config.num_object_labels, (batch, num_objects), generator=g),
                        torch.rand(batch, num_objects, generator=g)),
                "attr": (torch.randint(0, config.num_attr_labels, (batch, num_objects), generator=g),
                         torch.rand(batch, num_objects, generator=g)),
                "feat": (feats.clone(), obj_masked.float()),
            },
            "matched_label": matched,
            "ans": ans,
        })
    return to_device(out, device)


_STATES = {}


def reference_state(config, cls_name):
    """transformers' randomly initialised weights (seed 0), on the CPU: every implementation loads these."""
    import transformers

    key = (cls_name, config.to_json_string())
    if key not in _STATES:
        torch.manual_seed(0)
        _STATES[key] = getattr(transformers, cls_name)(config).state_dict()
    return _STATES[key]


def build(impl, config, state, cls_name, device):
    """A fresh model of ``impl`` ("transformers" or "lxmert_fast[<backend>]") with the reference weights, created
    directly on ``device`` (random initialisation of 228M parameters on the host would take seconds)."""
    with torch.device(device):
        if impl.startswith("transformers"):
            import transformers

            model = getattr(transformers, cls_name)(config)
        else:
            backend = impl.split("[")[1].rstrip("]")
            model = getattr(ours_classes(), cls_name)(config, backend=backend)
    model.load_state_dict(state)
    return model


def our_backends(bench):
    return ["triton", "torch"] if bench.cuda else ["torch"]


def split_impl(impl):
    """"lxmert_fast[triton] graphed" -> ("lxmert_fast[triton]", "graphed"); no mode given means eager."""
    name, _, mode = impl.partition(" ")
    if mode not in MODES:
        raise ValueError(f"{impl!r}: mode must be one of {MODES}")
    return name, mode


def _graph(step, optimizer, batch):
    """A CUDA-graphed ``step`` (lxmert_fast.train.cuda_graphs.GraphedStep), warmed up and captured before timing."""
    from lxmert_fast.train.cuda_graphs import GraphedStep

    graphed = GraphedStep(step, optimizer)
    for _ in range(graphed.warmup + 1):
        graphed(batch)
    return lambda: graphed(batch)


def our_extras(batch, train, static=False):
    """lxmert_fast's keyword arguments for a step as pretrain.py runs it, with the same outputs and losses as
    transformers': the LM head at the masked tokens only, and for a compiled or graphed step (``static``) the
    static shapes that let it skip most of the text padding and LM-head rows too (the text statistics are the
    batch's own; pretrain.py takes them from the data set)."""
    from lxmert_fast.model.static_shapes import StaticShapes

    extra = {"lm_logits_at_labels_only": True} if train else {}
    if static:
        mask = batch["attention_mask"].cpu()
        lengths = mask.sum(1).double()
        shapes = StaticShapes.from_statistics(*mask.shape, lengths.mean().item(), lengths.std().item(),
                                              mask_rate=0.15 if train else None)
        assert shapes.fits({k: v.cpu() for k, v in batch.items() if k in ("attention_mask", "labels")})
        extra["static_shapes"] = shapes
    return extra


def _train_step(model, batch, dtype, device, mode, ours, extra=None):
    """``ours``: with our_extras (the same loss as transformers'); ``extra``: other keyword arguments instead."""
    cuda, graphed = device.type == "cuda", "graphed" in mode
    if extra is None:
        extra = our_extras(batch, train=True, static=mode != "") if ours else {}
    if graphed and dtype == torch.float16:
        raise ValueError("fp16 is not graphed: its GradScaler reads the overflow flag on the host at every step")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda, capturable=graphed)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    fwd = torch.compile(model) if "compiled" in mode else model
    model.train()

    def step(batch=batch):
        # autocast's weight-cast cache must not outlive a graph capture
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=not graphed):
            loss = fwd(**batch, **extra).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if not graphed:  # GraphedStep resets the gradients itself
            opt.zero_grad(set_to_none=True)
        return loss

    return _graph(step, opt, batch) if graphed else step


def _infer_step(model, batch, dtype, device, mode, ours):
    graphed = "graphed" in mode
    extra = our_extras(batch, train=False, static=mode != "") if ours else {}
    fwd = torch.compile(model) if "compiled" in mode else model
    model.eval()

    def step(batch=batch):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                                                    cache_enabled=not graphed):
            return fwd(**batch, **extra).prediction_logits

    return _graph(step, None, batch) if graphed else step


def measure_models(bench, benchmark, case, impls, config, batch, batch_size, dtype_name, step_kind):
    """Build each implementation in turn (one on the device at a time), time its step, record it. ``impls`` are
    "NAME[ MODE]" (see split_impl). Our first implementation is also timed by pytest-benchmark (synchronised), whose
    extra_info then holds every record."""
    dev, dtype = bench.device, bench.dtype(dtype_name)
    state = reference_state(config, "LxmertForPreTraining")
    s = bench.shapes
    if step_kind == "train":
        flops = pretraining_flops_per_sample(config, s["text_len"], s["num_objects"], lm_head="masked")
    else:
        flops = count_flops(config, s["text_len"], s["num_objects"]).forward_total
    failed, pedantic_done = {}, False
    for impl in impls:
        name, mode = split_impl(impl)
        role = "baseline" if impl.startswith("transformers") else "ours"
        model = step = None
        try:
            model = build(name, config, state, "LxmertForPreTraining", dev)
            make = _train_step if step_kind == "train" else _infer_step
            step = make(model, batch, dtype, dev, mode, ours=role == "ours")
            if bench.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms, timer = bench.time_ms(step, graph=False, iters=None if bench.cuda else 3)
            peak = torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else None
            if role == "ours" and not pedantic_done:

                def synchronised(step=step):
                    step()
                    bench.sync()

                benchmark.pedantic(synchronised, rounds=3 if bench.full else 1, iterations=1)
                pedantic_done = True
        except Exception as exc:  # noqa: BLE001 - recorded; the test fails below if it was ours
            failed[impl] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            continue
        finally:
            del model, step
            if bench.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        bench.record(SUITE, case, impl, ms, role, flops=flops * batch_size, dtype=dtype_name, timer=timer,
                     samples_per_s=batch_size / (ms * 1e-3), peak_mem_gb=peak,
                     params={"batch": batch_size, "step": step_kind, "mode": mode, "failed": failed,
                             "text_len": s["text_len"], "num_objects": s["num_objects"]})
    recs = bench.finish_case(SUITE, case, benchmark)
    ours_failed = {k: v for k, v in failed.items() if not k.startswith("transformers")}
    if ours_failed or not recs:
        pytest.fail(f"{case}: failed: {failed}")
    return recs


@pytest.mark.parametrize("step_kind", ["train", "infer"])
def test_pretraining_model(bench, benchmark, model_case, step_kind):
    model_batch, dtype_name = model_case
    ours_classes()
    config = model_config(bench)
    s = bench.shapes
    batch = make_batch(config, model_batch, s["text_len"], s["num_objects"], bench.device,
                       labels=step_kind == "train")
    impls = [f"lxmert_fast[{b}]" for b in our_backends(bench)] + ["transformers"]
    case = f"{step_kind}/{dtype_name}/B{model_batch}"
    measure_models(bench, benchmark, case, impls, config, batch, model_batch, dtype_name, step_kind)


@pytest.mark.parametrize("step_kind", ["train", "infer"])
def test_pretraining_model_fast(bench, benchmark, step_kind):
    """The step without launch overhead: CUDA-graphed and torch.compile'd variants of ours next to transformers'
    eager and graphed, bf16 at one batch size (GPU only: CUDA graphs; compiling takes minutes on a CPU)."""
    ours_classes()
    if not (bench.full and bench.cuda):
        pytest.skip("graphed and compiled steps: full mode on a CUDA GPU only")
    config = model_config(bench)
    s, bsz = bench.shapes, bench.shape("compile_batch")
    batch = make_batch(config, bsz, s["text_len"], s["num_objects"], bench.device, labels=step_kind == "train")
    impls = ["lxmert_fast[torch] compiled+graphed", "lxmert_fast[triton] graphed", "lxmert_fast[torch] graphed"]
    if step_kind == "train":
        impls.append("lxmert_fast[triton] compiled+graphed")
    impls += ["transformers graphed", "transformers"]
    measure_models(bench, benchmark, f"{step_kind}-fast/bf16/B{bsz}", impls, config, batch, bsz, "bf16", step_kind)


CPU_ROUNDS = 7  # timed rounds of the CPU target; each round runs one step of every implementation


def test_cpu_target(bench, benchmark, cpu_batch):
    """The CPU target: LxmertModel forward + backward, train mode, padded captions; ours (torch) vs HF.
    The implementations' steps alternate round by round and each gets the median of its rounds: a shared CPU's
    speed drifts by 10-30% within minutes, and timing one implementation after the other measured the drift."""
    ours_classes()
    config = model_config(bench)
    s, cpu = bench.shapes, torch.device("cpu")
    batch = make_batch(config, cpu_batch, s["text_len"], s["num_objects"], cpu, seed=1, labels=False)
    state = reference_state(config, "LxmertModel")
    case = f"LxmertModel fwd+bwd train/fp32/B{cpu_batch}"
    steps = {}
    for impl in ("lxmert_fast[torch]", "transformers"):
        model = build(impl, config, state, "LxmertModel", cpu).train()

        def step(model=model):
            out = model(**batch)
            loss = out.language_output.mean() + out.vision_output.mean() + out.pooled_output.mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        steps[impl] = step
    if bench.full:
        times = {impl: [] for impl in steps}
        for step in steps.values():
            step()  # warm-up
        for _ in range(CPU_ROUNDS):
            for impl, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
        timings = {impl: (statistics.median(t) * 1e3, f"CPU wall-clock, median of {CPU_ROUNDS} alternating rounds")
                   for impl, t in times.items()}
    else:
        timings = {impl: bench.time_ms(step) for impl, step in steps.items()}
    for impl, (ms, timer) in timings.items():
        bench.record(TARGET_SUITE, case, impl, ms, "ours" if impl.startswith("lxmert") else "baseline",
                     dtype="fp32", timer=timer, samples_per_s=cpu_batch / (ms * 1e-3),
                     params={"batch": cpu_batch, "threads": torch.get_num_threads(), "device": "cpu"})
    recs = bench.finish_case(TARGET_SUITE, case)
    ours = next(r for r in recs if r["role"] == "ours")
    ours["target_speedup"] = CPU_TARGET_SPEEDUP
    ours["target_met"] = ours["speedup"]["transformers"] >= CPU_TARGET_SPEEDUP
    benchmark.extra_info.update({"records": recs})
    benchmark.pedantic(steps["lxmert_fast[torch]"], rounds=1, iterations=1)


def test_capacity_ab_script_runs(bench):
    """Smoke mode only: benchmarks/capacity_ab.py (run by hand, on a GPU the first number for the static row
    counts) works end to end at a tiny batch, in its own process."""
    if bench.full:
        pytest.skip("a harness check: run the script itself for a measurement")
    script = Path(__file__).with_name("capacity_ab.py")
    with tempfile.TemporaryDirectory() as tmp:  # the tiny config: the base model takes minutes on a CPU
        config = Path(tmp) / "tiny.json"
        tiny_config().to_json_file(config)
        done = subprocess.run([sys.executable, str(script), "--batch", "4", "--rounds", "1", "--model-config",
                               str(config)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "without row counts:" in done.stdout and re.search(r"speed-up: \d+\.\d+x", done.stdout), done.stdout


def test_model_results_well_formed(bench, tmp_path):
    recs = [r for r in bench.records if r["suite"] in (SUITE, TARGET_SUITE)]
    if not recs:
        pytest.skip("no model measurements in this run (deselected or skipped)")
    back = bench.check_results(recs, tmp_path, {"transformers"})
    for r in back["records"]:
        assert r["samples_per_s"] > 0 and math.isfinite(r["samples_per_s"])
        if bench.cuda and r["suite"] == SUITE:
            assert r["peak_mem_gb"] > 0
