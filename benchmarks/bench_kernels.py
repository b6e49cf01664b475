"""Kernel benchmarks: the three fused ops of lxmert_fast.kernels against their baselines, forward / backward / both.

One test per (op, batch, dtype) times every implementation on the same inputs in the same process:
- add_layernorm: eager ``add_layernorm_ref``, ``torch.compile`` of it, apex ``FusedLayerNorm`` (when importable);
- bidirectional_cross_attention: eager ref, compiled ref, two masked ``F.scaled_dot_product_attention`` calls per
  SDPA backend that accepts the masks at these shapes, xformers ``memory_efficient_attention`` (when importable);
- roi_position_embedding: eager ref, compiled ref; the 2048 -> 768 GEMM that all of them share is also timed alone
  so the speed-up of what follows the GEMM can be read off.
"fwd" is the training forward (inputs require grad, autograd saves what backward needs); "bwd" replays backward
over one forward (retain_graph); "both" is forward + backward. dropout_p = 0 throughout.

Bytes are the minimum the op's interface must move (inputs read once, outputs written once, intermediates never),
FLOPs count matrix products only; the roofline fraction compares the time with both at the device's datasheet peaks.
"""


import pytest
import torch
import torch.nn.functional as F

MODES = ("fwd", "bwd", "both")
SUITE = "kernels"
_compiled = {}


def _kernels(bench):
    if bench.full and not bench.cuda:
        pytest.skip("full mode times the Triton kernels on CUDA only (without it they run under Triton's interpreter)")
    try:
        from lxmert_fast.kernels import ops as kernels
    except Exception as exc:  # noqa: BLE001 - an import error of any kind means there is nothing to time
        pytest.skip(f"lxmert_fast.kernels is not importable: {type(exc).__name__}: {exc}")
    return kernels


def _compiled_ref(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _timed_callables(fn, leaves, grads):
    """(fwd, bwd-prepare, both) callables for an implementation ``fn`` whose outputs receive ``grads``."""

    def clear():
        for t in leaves:
            t.grad = None

    def fwd():
        return fn()

    def prepare_bwd():
        outs = _outputs(fn())

        def bwd():
            clear()
            torch.autograd.backward(outs, grads, retain_graph=True)

        return bwd

    def both():
        clear()
        torch.autograd.backward(_outputs(fn()), grads)

    return fwd, prepare_bwd, both


def run_case(bench, benchmark, kernel, case, impls, leaves, grads, cost, dtype_name, params, extra_ms=None):
    """Time every implementation in every mode and record it. impls: [(name, role, fn)]; cost[mode] = (flops, bytes).

    An implementation that raises is dropped from the case with its reason (params["failed"]); the others are still
    measured and written, and the test fails afterwards if it was ours."""
    failed = params.setdefault("failed", {})
    ours_both = None
    for mode in MODES:
        for name, role, fn in impls:
            if name in failed:
                continue
            fwd, prepare_bwd, both = _timed_callables(fn, leaves, grads)
            try:
                if mode == "fwd":
                    ms, timer = bench.time_ms(fwd)
                elif mode == "bwd":
                    ms, timer = bench.time_ms(None, prepare=prepare_bwd)
                else:
                    ms, timer = bench.time_ms(both)
            except Exception as exc:  # noqa: BLE001 - recorded, and re-raised below for ours
                failed[name] = f"{mode}: {type(exc).__name__}: {str(exc).strip()[:300]}"
                bench.sync()
                continue
            if role == "ours" and mode == "both":
                ours_both = both
            flops, nbytes = cost[mode]
            extra = {"timer": timer}
            if extra_ms:
                extra.update({k: v[mode] for k, v in extra_ms.items()})
            bench.record(SUITE, f"{case}/{mode}", name, ms, role, flops=flops, nbytes=nbytes, dtype=dtype_name,
                         params={**params, "kernel": kernel, "mode": mode}, **extra)
        recs = bench.finish_case(SUITE, f"{case}/{mode}")
        if extra_ms and "gemm_ms" in extra_ms:
            _speedup_after_gemm(recs)
    ours_failed = {n: r for n, r in failed.items() if any(n == i[0] and i[1] == "ours" for i in impls)}
    if ours_failed:
        pytest.fail(f"{case}: ours failed: {ours_failed}")

    def ours_synchronised():
        ours_both()
        bench.sync()

    benchmark.extra_info.update({"case": case, "records": [r for r in bench.records if r["case"].startswith(case)]})
    benchmark.pedantic(ours_synchronised, rounds=20 if bench.full else 1, iterations=1, warmup_rounds=1)


def _speedup_after_gemm(recs):
    """Speed-up of the part after the shared GEMM: (baseline - gemm) / (ours - gemm), where both are positive."""
    ours = [r for r in recs if r["role"] == "ours"]
    for r in ours:
        own = r["ms"] - r["gemm_ms"]
        r["speedup_after_gemm"] = {
            b["impl"]: (b["ms"] - b["gemm_ms"]) / own
            for b in recs
            if b["role"] == "baseline" and own > 0 and b["ms"] - b["gemm_ms"] > 0
        }


def _add_compile(bench, impls, name, ref, args, kwargs=None):
    """The torch.compile baseline, full mode only (compiling takes far longer than a smoke run's one iteration)."""
    if not bench.full:
        return
    compiled = _compiled_ref(name, ref)
    impls.append(("torch.compile(ref)", "baseline", lambda: compiled(*args, **(kwargs or {}))))


# -- add_layernorm ---------------------------------------------------------------------------------------------
def test_add_layernorm(bench, benchmark, kernel_case):
    kernel_batch, dtype_name = kernel_case
    k = _kernels(bench)
    s, dev, dtype = bench.shapes, bench.device, bench.dtype(dtype_name)
    rows, n = kernel_batch * s["text_len"], s["hidden"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(kernel_batch, s["text_len"], n, generator=g).to(dev, dtype).requires_grad_()
    res = torch.randn(kernel_batch, s["text_len"], n, generator=g).to(dev, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dev, dtype).requires_grad_()
    b = (0.1 * torch.randn(n, generator=g)).to(dev, dtype).requires_grad_()
    dy = torch.randn(kernel_batch, s["text_len"], n, generator=g).to(dev, dtype)
    eps = 1e-12

    impls = [
        ("lxmert_fast", "ours", lambda: k.add_layernorm(x, res, w, b, eps)),
        ("eager ref", "baseline", lambda: k.add_layernorm_ref(x, res, w, b, eps)),
    ]
    _add_compile(bench, impls, "add_layernorm", k.add_layernorm_ref, (x, res, w, b, eps))
    leaves = [x, res, w, b]
    try:
        from apex.normalization import FusedLayerNorm
    except Exception:  # noqa: BLE001 - not installed, or built for another torch
        FusedLayerNorm = None
    if FusedLayerNorm is not None:
        apex_ln = FusedLayerNorm(n, eps=eps).to(dev, dtype)
        with torch.no_grad():
            apex_ln.weight.copy_(w)
            apex_ln.bias.copy_(b)
        impls.append(("apex FusedLayerNorm(x + residual)", "baseline", lambda: apex_ln(x + res)))
        leaves += list(apex_ln.parameters())

    e = x.element_size()
    # fwd: read x, residual; write y. bwd: read dy and the pre-norm sum (or x and residual), write dx and dresidual.
    cost = {"fwd": (None, 3 * rows * n * e), "bwd": (None, 4 * rows * n * e), "both": (None, 7 * rows * n * e)}
    case = f"add_layernorm/{dtype_name}/B{kernel_batch}"
    params = {"batch": kernel_batch, "rows": rows, "hidden": n}
    run_case(bench, benchmark, "add_layernorm", case, impls, leaves, (dy,), cost, dtype_name, params)


# -- bidirectional_cross_attention ---------------------------------------------------------------------------
def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _sdpa_pair(backend, lq, lk, lv, vq, vk, vv, lang_mask, visn_mask):
    """LXMERT's two cross-attention directions as two SDPA calls with boolean key masks (True = attend)."""
    from torch.nn.attention import sdpa_kernel

    lang_keep = lang_mask[:, None, None, :]
    visn_keep = visn_mask[:, None, None, :]

    def run():
        with sdpa_kernel([backend]):
            return (F.scaled_dot_product_attention(lq, vk, vv, attn_mask=visn_keep),
                    F.scaled_dot_product_attention(vq, lk, lv, attn_mask=lang_keep))

    return run


def _xformers_pair(lq, lk, lv, vq, vk, vv, lang_mask, visn_mask):
    import xformers.ops as xops

    def bias(keep, n_q):
        # xformers wants the bias's last dim padded to a multiple of 8 in memory; the view keeps the real length.
        b, n_k = keep.shape
        full = torch.zeros(b, lq.shape[1], n_q, (n_k + 7) // 8 * 8, device=keep.device, dtype=lq.dtype)
        full[..., :n_k].masked_fill_(~keep[:, None, None, :], float("-inf"))
        return full[..., :n_k]

    to_bmhk = lambda t: t.transpose(1, 2)  # (B, H, L, D) -> (B, L, H, D), xformers' layout
    lang_bias, visn_bias = bias(visn_mask, lq.shape[2]), bias(lang_mask, vq.shape[2])

    def run():
        lang = xops.memory_efficient_attention(to_bmhk(lq), to_bmhk(vk), to_bmhk(vv), attn_bias=lang_bias)
        visn = xops.memory_efficient_attention(to_bmhk(vq), to_bmhk(lk), to_bmhk(lv), attn_bias=visn_bias)
        return lang.transpose(1, 2), visn.transpose(1, 2)

    return run


def _works(fn, grads):
    """Whether fn runs forward and backward here (an SDPA backend may refuse masks or shapes); returns the reason."""
    try:
        torch.autograd.backward(_outputs(fn()), grads)
        return None
    except Exception as exc:  # noqa: BLE001 - a refusing backend raises RuntimeError, NotImplementedError, ...
        return f"{type(exc).__name__}: {_reason(str(exc))}"


def _reason(message: str) -> str:
    """The message's first line; for xformers' "No operator found", also each operator's reasons for refusing
    (everything from the first "... is not supported because:"), which says what to change (a wheel, an alignment)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    start = next((i for i, line in enumerate(lines) if "not supported because" in line), None)
    if start is None:
        return lines[0][:160]
    return " ".join([lines[0][:160]] + lines[start:])[:1000]


def _cross_attention_inputs(bench, bsz, dtype_name):
    """q, k, v of both streams (B, H, L, D), the key masks (True = attend) and the output gradients."""
    s, dev, dtype = bench.shapes, bench.device, bench.dtype(dtype_name)
    heads, n_l, n_v = s["heads"], s["text_len"], s["num_objects"]
    d = s["hidden"] // heads
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda n: torch.randn(bsz, heads, n, d, generator=g).to(dev, dtype).requires_grad_()
    lq, lk, lv = rand(n_l), rand(n_l), rand(n_l)
    vq, vk, vv = rand(n_v), rand(n_v), rand(n_v)
    lengths = torch.randint(8, n_l + 1, (bsz,), generator=g)  # captions of 8-20 tokens padded to 20
    lang_mask = (torch.arange(n_l)[None, :] < lengths[:, None]).to(dev)
    visn_mask = torch.ones(bsz, n_v, dtype=torch.bool, device=dev)  # 36 real objects, as in pre-training
    grads = (torch.randn(bsz, heads, n_l, d, generator=g).to(dev, dtype),
             torch.randn(bsz, heads, n_v, d, generator=g).to(dev, dtype))
    return (lq, lk, lv, vq, vk, vv, lang_mask, visn_mask), grads


def _library_attention_baselines(args, grads):
    """(impls, unavailable): every SDPA backend and xformers that run forward and backward on these inputs, and
    the reason each of the others cannot."""
    impls, unavailable = [], {}
    for name, backend in _sdpa_backends():
        fn = _sdpa_pair(backend, *args)
        reason = _works(fn, grads)
        if reason is None:
            impls.append((f"sdpa[{name}] x2", "baseline", fn))
        else:
            unavailable[f"sdpa[{name}]"] = reason
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a binary built for another torch
        unavailable["xformers"] = f"not importable ({type(exc).__name__})"
        return impls, unavailable
    try:
        fn = _xformers_pair(*args)
    except Exception as exc:  # noqa: BLE001 - an xformers build that does not fit this torch
        fn, reason = None, f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    else:
        reason = _works(fn, grads)
    if reason is None:
        impls.append(("xformers memory_efficient_attention x2", "baseline", fn))
    else:
        unavailable["xformers"] = reason
    return impls, unavailable


def test_bidirectional_cross_attention(bench, benchmark, kernel_case):
    kernel_batch, dtype_name = kernel_case
    k = _kernels(bench)
    args, grads = _cross_attention_inputs(bench, kernel_batch, dtype_name)
    leaves = list(args[:6])  # q, k, v of both streams; the masks get no gradient
    bsz, heads, n_l, d = args[0].shape  # language queries
    n_v = args[3].shape[2]  # visual queries

    impls = [
        ("lxmert_fast", "ours", lambda: k.bidirectional_cross_attention(*args)),
        ("eager ref", "baseline", lambda: k.bidirectional_cross_attention_ref(*args)),
    ]
    _add_compile(bench, impls, "bidirectional_cross_attention", k.bidirectional_cross_attention_ref, args)
    library_impls, unavailable = _library_attention_baselines(args, grads)
    impls += library_impls

    e = args[0].element_size()
    tokens = bsz * heads * (n_l + n_v) * d
    fwd_flops = 2 * 2 * 2 * bsz * heads * n_l * n_v * d  # 2 directions x (QK^T, PV) x 2 FLOPs per MAC
    # fwd reads q, k, v and writes o; bwd reads q, k, v, o, do and writes dq, dk, dv (masks: B x 56 bytes, ignored).
    cost = {"fwd": (fwd_flops, 4 * tokens * e), "bwd": (2.5 * fwd_flops, 8 * tokens * e),
            "both": (3.5 * fwd_flops, 12 * tokens * e)}
    case = f"cross_attention/{dtype_name}/B{kernel_batch}"
    params = {"batch": bsz, "heads": heads, "head_dim": d, "text_len": n_l, "num_objects": n_v,
              "unavailable": unavailable}
    run_case(bench, benchmark, "bidirectional_cross_attention", case, impls, leaves, grads, cost, dtype_name, params)
    if bench.cuda:
        # On an H100 at least the memory-efficient and math SDPA backends take boolean masks.
        assert any(name.startswith("sdpa") for name, _, _ in impls), unavailable


# -- roi_position_embedding ----------------------------------------------------------------------------------
def test_roi_position_embedding(bench, benchmark, kernel_case):
    kernel_batch, dtype_name = kernel_case
    k = _kernels(bench)
    s, dev, dtype = bench.shapes, bench.device, bench.dtype(dtype_name)
    rows, n, f = kernel_batch * s["num_objects"], s["hidden"], s["feat_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def param(*shape, scale, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=g)).to(dev, dtype).requires_grad_()

    # Features and boxes are data (no gradient), as in the model; every parameter gets one.
    feats = torch.randn(kernel_batch, s["num_objects"], f, generator=g).relu().to(dev, dtype)
    boxes = torch.rand(kernel_batch, s["num_objects"], 4, generator=g).to(dev, dtype)
    # feat_weight, feat_bias, feat_ln_weight, feat_ln_bias, box_weight, box_bias, box_ln_weight, box_ln_bias
    params_ = [param(n, f, scale=f**-0.5), param(n, scale=0.02), param(n, scale=0.1, mean=1.0), param(n, scale=0.1),
               param(n, 4, scale=0.5), param(n, scale=0.02), param(n, scale=0.1, mean=1.0), param(n, scale=0.1)]
    dy = torch.randn(kernel_batch, s["num_objects"], n, generator=g).to(dev, dtype)
    args = (feats, boxes, *params_)

    impls = [
        ("lxmert_fast", "ours", lambda: k.roi_position_embedding(*args)),
        ("eager ref", "baseline", lambda: k.roi_position_embedding_ref(*args)),
    ]
    _add_compile(bench, impls, "roi_position_embedding", k.roi_position_embedding_ref, args)

    # The GEMM every implementation shares, timed alone in each mode (its weight and bias get gradients).
    w_f, b_f = params_[0], params_[1]
    gemm_fwd, gemm_prepare_bwd, gemm_both = _timed_callables(lambda: F.linear(feats, w_f, b_f), [w_f, b_f], (dy,))
    gemm_ms = {"fwd": bench.time_ms(gemm_fwd)[0], "bwd": bench.time_ms(None, prepare=gemm_prepare_bwd)[0],
               "both": bench.time_ms(gemm_both)[0]}

    e = feats.element_size()
    gemm_flops = 2 * rows * f * n
    box_flops = 2 * rows * 4 * n
    # fwd reads feats, boxes, W_f and writes y; bwd reads dy, feats (for dW_f), the GEMM output, writes dW_f.
    fwd_bytes = (rows * f + rows * 4 + f * n + rows * n) * e
    bwd_bytes = (rows * n + rows * f + rows * n + f * n) * e
    cost = {"fwd": (gemm_flops + box_flops, fwd_bytes), "bwd": (gemm_flops + 2 * box_flops, bwd_bytes),
            "both": (2 * gemm_flops + 3 * box_flops, fwd_bytes + bwd_bytes)}
    case = f"roi_position_embedding/{dtype_name}/B{kernel_batch}"
    params = {"batch": kernel_batch, "rows": rows, "hidden": n, "feat_dim": f}
    run_case(bench, benchmark, "roi_position_embedding", case, impls, params_, (dy,), cost, dtype_name, params,
             extra_ms={"gemm_ms": gemm_ms})


# -- the harness check (smoke mode's purpose; also runs at the end of a full run) -----------------------------
def test_kernel_results_well_formed(bench, tmp_path):
    recs = bench.records_of(SUITE, "kernel")
    required = {"eager ref", "torch.compile(ref)"} if bench.full else {"eager ref"}
    bench.check_results(recs, tmp_path, required)
