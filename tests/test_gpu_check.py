"""`make gpu-check` on a machine without a GPU says so and exits NO_GPU, a status of its own; its verdict on the
weights a training step leaves is checked here on CPU tensors (the GPU runs themselves need a GPU)."""

import pytest
import torch

from harness.commands.cli import main
from harness.commands.gpu_check import NO_GPU, weight_change


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the checks themselves")
def test_without_a_gpu_it_checks_nothing_and_exits_with_its_own_status(capsys):
    assert main(["gpu-check"]) == NO_GPU
    out = capsys.readouterr().out
    assert "no CUDA GPU visible" in out and "nothing checked" in out and f"exit status {NO_GPU}" in out
    assert "PASS" not in out and "FAIL" not in out
    assert NO_GPU not in (0, 1, 2, 130)  # success, a failed check, bad input, interrupted


def _adamw_step(weights: dict[str, torch.Tensor], lr: float = 1e-5) -> dict[str, torch.Tensor]:
    params = [torch.nn.Parameter(w.clone()) for w in weights.values()]
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(params, lr=lr, weight_decay=0.0).step()
    return {name: p.detach() for name, p in zip(weights, params, strict=True)}


def test_weight_change_passes_fp32_master_weights_that_moved_and_gives_the_numbers():
    torch.manual_seed(0)
    before = {"a.weight": torch.randn(64, 64) * 0.02, "b.weight": torch.randn(64) * 0.02}
    passed, detail = weight_change(before, _adamw_step(before))
    assert passed, detail
    assert "2 trainable tensors, dtypes ['torch.float32']; 100.0% of 4,160 elements moved" in detail
    assert "0 tensors unchanged" in detail


def test_weight_change_fails_bf16_weights_and_names_an_unchanged_tensor():
    torch.manual_seed(0)
    before = {"a.weight": torch.randn(64, 64) * 0.02}
    bf16 = {n: w.bfloat16() for n, w in before.items()}
    passed, detail = weight_change(bf16, _adamw_step(bf16))
    assert not passed and "dtypes ['torch.bfloat16']" in detail
    frozen = {"a.weight": before["a.weight"], "b.weight": torch.ones(4)}
    passed, detail = weight_change(frozen, {"a.weight": _adamw_step(before)["a.weight"], "b.weight": torch.ones(4)})
    assert not passed and "1 tensors unchanged (first: b.weight)" in detail
