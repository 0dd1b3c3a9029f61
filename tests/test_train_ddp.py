"""DDP on CPU (gloo, 2 processes): every rank must hold the same alphas and sizes after every step."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from dynoswap.engine import convert
    from dynoswap.train import fit, load_data, small_vgg
    from dynoswap.train.distributed import init_from_env, sync_alphas

    ctx = init_from_env("cpu")
    assert ctx.enabled and ctx.rank == rank and dist.get_backend() == "gloo"
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    gm, _ = convert(small_vgg(widths=(8, 16, 32)), (32, 32))
    bundle = load_data("barcodes")
    train = Subset(bundle.train, range(256))
    loader = DataLoader(train, batch_size=16, sampler=DistributedSampler(train, world, rank, seed=0))
    trace = []

    def on_step(step, metrics):
        pools = [m for m in gm.modules() if type(m).__name__ == "DynOPool2d"]
        trace.append(
            {
                "step": step,
                "alphas": [p.alpha.detach().clone() for p in pools],
                "sizes": [p.last_out_size for p in pools],
            }
        )

    records = fit(gm, loader, epochs=1, max_steps=4, lam=200.0, lr=0.05, alpha_lr=0.2, progress=False, on_step=on_step)

    # The guard: an injected one-ulp drift on rank 1 is found and undone from rank 0.
    alpha = next(m for m in gm.modules() if type(m).__name__ == "DynOPool2d").alpha
    before = alpha.detach().clone()
    if rank == 1:
        with torch.no_grad():
            alpha.add_(1e-6)
    drift = sync_alphas(gm, ctx)
    torch.save(
        {
            "trace": trace,
            "records": records,
            "drift": drift,
            "after_sync": alpha.detach().clone(),
            "before": before,
            "weights": {k: v.detach().clone() for k, v in gm.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_process_gloo_keeps_alphas_and_sizes_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert len(r0["trace"]) == len(r1["trace"]) == 4
    for a, b in zip(r0["trace"], r1["trace"], strict=True):
        assert a["step"] == b["step"]
        for x, y in zip(a["alphas"], b["alphas"], strict=True):
            assert torch.equal(x, y)
        assert a["sizes"] == b["sizes"]
    # The alphas did train (lambda pushes them up), identically.
    assert not torch.equal(r0["trace"][0]["alphas"][0], r0["trace"][-1]["alphas"][0])
    # Parameters agree; BatchNorm statistics are rank-local between DDP's per-forward broadcasts.
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    # Metrics are reduced over ranks: both report the same epoch record.
    assert r0["records"][0]["train_acc"] == r1["records"][0]["train_acc"]
    assert r0["records"][0]["alpha_drift"] == r1["records"][0]["alpha_drift"] == 0.0
    assert r0["drift"] == 0.0 and r1["drift"] > 0
    assert torch.equal(r1["after_sync"], r0["before"]) and torch.equal(r0["after_sync"], r0["before"])
