"""track_tensor_memory counts the storages ops create inside the block, from creation to free, and nothing else."""

from __future__ import annotations

import torch

from lightning_peft import track_tensor_memory

KIB = 1024


def test_views_in_place_results_and_older_storages_do_not_count():
    w = torch.randn(64, 64, requires_grad=True)  # 16 KiB before the block
    with track_tensor_memory() as mem:
        v = w.detach().view(-1)[:10]  # a view of w's storage
        w.data.mul_(1.0)  # in place on w
        assert mem.current == 0 and v.numel() == 10
        y = torch.empty(4 * KIB, dtype=torch.uint8)
        y.add_(1)  # in place on a storage the block made: still 4 KiB
    assert (mem.peak, mem.current) == (4 * KIB, 4 * KIB)


def test_freed_storages_leave_current_but_stay_in_the_peak():
    with track_tensor_memory() as mem:
        a = torch.zeros(1000, dtype=torch.float32)  # 4,000 bytes
        b = a * 2  # 4,000
        del a
        c = torch.ones(250, dtype=torch.float64)  # 2,000: the peak stays 8,000
    assert (mem.peak, mem.current) == (8000, 6000)
    del b, c
    assert mem.current == 0  # freed after the block still counts off


def test_backward_on_the_cpu_counts_gradients_and_activations_then_frees_them():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512)  # the weight's gradient: 512·256·4 bytes = 512 KiB
    x = torch.randn(128, 256)
    with track_tensor_memory() as mem:
        layer(x).relu().sum().backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in layer.parameters())
    activation = 128 * 512 * 4  # relu's output, kept for its backward
    assert mem.current == grads  # only the gradients outlive the step
    assert mem.peak >= grads + activation
    layer.zero_grad(set_to_none=True)
    assert mem.current == 0


def test_grown_storages_count_their_new_size_and_sparse_or_shared_storages_do_not_break_it():
    w = torch.randn(1000)
    with track_tensor_memory() as mem:
        y = torch.empty(0)
        torch.randn(1000, out=y)  # out= grows the block's own storage: 4,000 bytes
        assert mem.current == 4000
        y.resize_(2000)
        assert mem.current == 8000
        shared = torch.empty(0).set_(w.untyped_storage())  # w's storage, older than the block
        sparse = torch.eye(4).to_sparse()  # counted through nothing, but no error
        product = torch.sparse.mm(sparse, torch.ones(4, 2))  # 32 bytes
    assert shared.numel() == 1000 and product.sum() == 8
    assert mem.current == 8000 + 32  # y and the product; the dense eye was freed, the sparse tensor has no plain storage
    assert mem.peak >= 8000 + 64  # the dense eye while it lived
