"""fp8kern.parallel on torch.distributed with gloo: W processes spawned from pytest (W = 2, 3, 4), each checking
its shard of a tiny Llama in every scheme against the single-device model (tests/parallel_worker.py says what
and how). Block-scaled shards here are not multiples of 128 (q/k/v rows split into 64 or 48, the MLP's 320 into
160, 107 or 80)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import parallel_worker  # noqa: E402

TIMEOUT_S = 600


def spawn(world: int, tmp_path) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    init = str(tmp_path / "init")
    procs = [ctx.Process(target=parallel_worker.main, args=(r, world, init, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [open(tmp_path / f"rank{r}.err").read() for r in range(world) if (tmp_path / f"rank{r}.err").exists()]
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s (a collective hung?); errors: {errors}"
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [open(tmp_path / f"rank{r}.ok").read() for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tensor_parallel_llama(tmp_path, world):
    reports = spawn(world, tmp_path)
    assert len(reports) == world and all(len(r.splitlines()) == len(parallel_worker.CASES) for r in reports)
    print(f"W={world}:\n{reports[0]}")


def test_no_process_group():
    import fp8kern

    model = parallel_worker.build(parallel_worker.llama(), "dynamic_per_token")[0]
    with pytest.raises(RuntimeError, match="needs an initialized default process group"):
        fp8kern.parallel.shard_model(model, tp_size=2)
