"""trainers/kernels.py: the compiled glue kernels against torch, and the CPU fast path
(trainers/cpu_fused.py) with and without them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers import kernels
from trainers.cpu_fused import FusedForward
from trainers.model import InternLM2Config, InternLM2ForCausalLM


@pytest.fixture
def lib():
    found = kernels.library()
    if found is None:
        pytest.skip(f"compiled kernels unavailable here: {kernels.why_not()}")
    return found


@pytest.mark.parametrize("n", [7, 1000, 70_001])  # a tail shorter than a vector; one thread; several threads
def test_swiglu_kernels_equal_torch(lib, n):
    g = torch.Generator().manual_seed(n)
    a0 = torch.randn(n, generator=g) * 6  # reaches sigmoid's flat ends
    a0[:3] = torch.tensor([-100.0, 100.0, 0.0])[: min(3, n)]
    b0, gh0 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a, sig, h = a0.clone(), torch.empty(n), torch.empty(n)
    kernels.swiglu_fwd(a, b0, sig, h)
    ref_sig = torch.sigmoid(a0)
    assert ((sig - ref_sig).abs() / ref_sig.clamp_min(1e-30)).max().item() < 1e-6
    assert torch.allclose(a, F.silu(a0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(h, F.silu(a0) * b0, rtol=1e-6, atol=1e-6)

    leaf_a, leaf_b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    (F.silu(leaf_a) * leaf_b).backward(gh0)
    gh, b = gh0.clone(), b0.clone()
    kernels.swiglu_bwd(gh, a, sig, b)  # b <- grad of a, gh <- grad of b
    assert torch.allclose(b, leaf_a.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gh, leaf_b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows,c", [(3, 64), (2048, 64), (37, 24)])
def test_rms_kernels_equal_torch(lib, rows, c):
    g = torch.Generator().manual_seed(rows)
    x0, g0, res = (torch.randn(rows, c, generator=g) * 3 for _ in range(3))
    xhat, rstd = torch.empty(rows, c), torch.empty(rows, 1)
    kernels.rms_fwd(x0, xhat, rstd, 1e-5)
    leaf = x0.clone().requires_grad_()
    ref_rstd = torch.rsqrt(leaf.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = leaf * ref_rstd
    assert torch.allclose(rstd, ref_rstd.detach(), rtol=1e-6)
    assert torch.allclose(xhat, ref.detach(), rtol=1e-6, atol=1e-6)
    ref.backward(g0)
    gx = g0.clone()
    kernels.rms_bwd(gx, xhat, rstd, None)
    assert torch.allclose(gx, leaf.grad, rtol=1e-5, atol=1e-5)
    gx = g0.clone()
    kernels.rms_bwd(gx, xhat, rstd, res)
    assert torch.allclose(gx, leaf.grad + res, rtol=1e-5, atol=1e-5)


def test_model_with_kernels_equals_the_aten_path(lib, monkeypatch):
    """The fused decoder layer and the final norm give the same logits and gradients (to fp32
    rounding) with the kernels as with ATen's ops; the kernels were called."""
    config = InternLM2Config(num_attention_heads=4, num_key_value_heads=2)
    model = InternLM2ForCausalLM(config, torch.Generator().manual_seed(3))
    fused = FusedForward(model)
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(4))
    calls = []
    monkeypatch.setattr(kernels, "rms_bwd", lambda *a, _f=kernels.rms_bwd: (calls.append("rms_bwd"), _f(*a))[1])

    def run():
        model.zero_grad()
        logits = fused(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with_logits, with_grads = run()
    assert calls.count("rms_bwd") == 5  # two norms per layer, the final one
    monkeypatch.setattr(kernels, "_lib", None)  # library() returns None: the ATen ops
    plain_logits, plain_grads = run()
    assert calls.count("rms_bwd") == 5
    assert 0 < (with_logits - plain_logits).abs().max().item() < 1e-5
    for name, grad in plain_grads.items():
        assert (with_grads[name] - grad).abs().max().item() <= 1e-5 * grad.abs().max().item(), name


def test_without_a_compiler_the_model_keeps_aten(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-gcc"))
    monkeypatch.setenv("EVO_CACHE_DIR", str(tmp_path))
    kernels.reset()
    try:
        with caplog.at_level("WARNING", logger="trainers.kernels"):
            assert kernels.library() is None
        assert "no-such-gcc" in kernels.why_not()
        assert [r.getMessage() for r in caplog.records] == [
            f"compiled CPU loops unavailable ({kernels.why_not()}); the CPU fast path uses ATen ops"]
        model = InternLM2ForCausalLM(InternLM2Config())
        logits = FusedForward(model)(torch.randint(0, 256, (2, 16)))
        logits.sum().backward()
        assert torch.isfinite(model.output.weight.grad).all()
        monkeypatch.setenv("EVO_CPU_KERNELS", "0")
        kernels.reset()
        assert kernels.library() is None and kernels.why_not() == "EVO_CPU_KERNELS=0"
    finally:
        kernels.reset()
