"""Data-parallel block-wise calibration: 2 CPU processes on gloo equal one process on the same global batch,
and a distributed run killed after a block resumes to the same result."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

PROMPTS = ["a red circle", "two blue squares"]


def _config():
    from bitflux.calibrate import CalibConfig
    from bitflux.calibrate.command import eval_settings

    kw, _ = eval_settings("toy")
    return CalibConfig(prompts=2, traj_steps=2, steps=12, batch=4, pipe_kwargs=kw, mode="blockwise", train="all", record_batch=2)


def _calibrate(root, work: str, on_block=None):
    """Sequential block-wise calibration of the toy transformer saved in `root/fp32`."""
    from bitflux.calibrate import sequential
    from bitflux.calibrate.api import calibrate_sequential
    from bitflux.toy.build import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    real = sequential.train_sequential
    if on_block is not None:
        sequential.train_sequential = lambda *a, **kw: real(*a, **kw, on_block=on_block)
    try:
        model, _ = calibrate_sequential(root / "fp32", PROMPTS, _config(), work_dir=root / work, pipe=pipe, progress=False)
    finally:
        sequential.train_sequential = real
    return model


def _worker(rank: int, world: int, port: int, root, work: str, kill_after: int | None) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)

    def on_block(i: int) -> None:
        if i == kill_after:
            os._exit(17)  # a hard kill of every process right after block i is saved

    from bitflux.calibrate import distributed

    real_shard, log = distributed.shard, root / f"shards-{rank}.txt"

    def shard(idx):
        mine = real_shard(idx)
        with open(log, "a") as f:
            f.write(f"{len(mine)}\n")
        return mine

    distributed.shard = shard

    model = _calibrate(root, work, on_block if kill_after is not None else None)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"{work}.safetensors"))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(root, work: str, kill_after: int | None = None) -> None:
    mp.spawn(_worker, args=(2, _port(), root, work, kill_after), nprocs=2, join=True)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_and_resume_after_a_kill(tmp_path):
    from safetensors.torch import load_file

    from bitflux.toy.build import build_pipeline

    torch.set_num_threads(1)
    build_pipeline(seed=0).transformer.save_pretrained(tmp_path / "fp32", max_shard_size="300KB")
    single = {k: v for k, v in _calibrate(tmp_path, "single").state_dict().items()}

    with pytest.raises(mp.ProcessExitedException):
        _spawn(tmp_path, "dp", kill_after=1)
    work = tmp_path / "dp"
    assert sorted(p.name for p in work.glob("block-*")) == ["block-000.safetensors", "block-001.safetensors"]
    assert not [p for p in work.rglob("*") if ".tmp" in p.name]
    _spawn(tmp_path, "dp")  # resumes from block 2
    dp = load_file(str(tmp_path / "dp.safetensors"))

    assert dp.keys() == single.keys()
    for k, v in single.items():
        if v.is_floating_point():  # sums over processes differ from one process only in float order
            assert torch.allclose(dp[k].float(), v.float(), rtol=1e-3, atol=1e-5), k
        else:
            assert torch.equal(dp[k], v), k  # the ternary codes agree exactly
    sizes = [(tmp_path / f"shards-{r}.txt").read_text().split() for r in (0, 1)]
    assert set(sizes[0]) == set(sizes[1]) == {"2"}  # each process took half of every global batch of 4


def _joint_config(shard: bool = False):
    from bitflux.calibrate import CalibConfig
    from bitflux.calibrate.command import eval_settings

    kw, _ = eval_settings("toy")
    return CalibConfig(prompts=2, traj_steps=2, steps=6, batch=4, pipe_kwargs=kw, mode="joint", train="all",
                       record_batch=2, checkpoint_every=2, on_policy_at=0.5, on_policy_rounds=1, shard=shard)


def _joint(root, work: str, kill_at: int | None = None, shard: bool = False):
    from bitflux.calibrate import calibrate
    from bitflux.toy.build import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)

    def on_step(step: int, _loss: float) -> None:
        if step == kill_at:
            os._exit(17)  # a hard kill of every process right after step `kill_at` (checkpointed at 4)

    model, stats = calibrate(pipe, PROMPTS, _joint_config(shard), work_dir=root / work, progress=False, on_step=on_step)
    return model, stats


def _joint_worker(rank: int, world: int, port: int, root, work: str, kill_at: int | None, shard: bool = False) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if shard:  # record how much of the student's trainable tensors this process holds
        from bitflux.calibrate import distributed, joint

        real = distributed.shard_model

        def spy(model):
            real(model)
            params = [p for p in model.parameters() if p.requires_grad]
            local = sum(p.to_local().numel() for p in params)
            (root / f"held-{rank}.txt").write_text(f"{local} {sum(p.numel() for p in params)}")
            return model

        joint.distributed.shard_model = spy
    model, stats = _joint(root, work, kill_at, shard)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"{work}.safetensors"),
                  metadata={"final_loss": str(stats["final_loss"])})
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp2"])
def test_joint_mode_on_two_gloo_processes_equals_one_and_resumes_after_a_kill(tmp_path, shard):
    """Joint calibration, on-policy refresh included: each process takes half of every global batch of 4,
    holding either a whole student or (FSDP2) half of it and of its Adam state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    single, stats = _joint(tmp_path, "single")
    single = single.state_dict()
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_joint_worker, args=(2, _port(), tmp_path, "dp", 5, shard), nprocs=2, join=True)
    assert [p.name for p in (tmp_path / "dp").glob("state-*")] == ["state-0000004.safetensors"]
    mp.spawn(_joint_worker, args=(2, _port(), tmp_path, "dp", None, shard), nprocs=2, join=True)
    if shard:
        held = [tuple(map(int, (tmp_path / f"held-{r}.txt").read_text().split())) for r in (0, 1)]
        assert held[0][1] == held[1][1] and held[0][0] + held[1][0] == held[0][1]  # the halves make the whole
        assert max(h[0] for h in held) <= 0.55 * held[0][1]  # and neither holds much more than half
    dp = load_file(str(tmp_path / "dp.safetensors"))
    assert dp.keys() == single.keys()
    for k, v in single.items():
        if v.is_floating_point():  # sums over processes differ from one process only in float order
            rtol = 1e-3 if v.dtype == torch.float32 else 2 ** -7  # stored bf16 scales: one ulp
            assert torch.allclose(dp[k].float(), v.float(), rtol=rtol, atol=1e-5), k
    codes = [k for k, v in single.items() if not v.is_floating_point()]
    assert codes and sum(torch.equal(dp[k], single[k]) for k in codes) >= len(codes) - 1  # at most a borderline code flips
    with safe_open(str(tmp_path / "dp.safetensors"), "pt") as f:
        assert abs(float(f.metadata()["final_loss"]) - stats["final_loss"]) <= 1e-4 * stats["final_loss"]
